"""Processing benchmark: stored webhook events handled per second by real
Celery workers (prefork, on Redis and PostgreSQL), Stripe played by the
simulator over HTTP.

    python bench/processing.py [--renewals 2000] [--failed-share 0.1 1.0]
                               [--workers 1 2] [--concurrency 4]

The workers start first and idle; then the events of a billing run are
stored in the inbox in one commit, as after a broker outage, and the clock
runs until every event is handled. A renewal that succeeds sends
invoice.created, invoice.finalized and invoice.paid; one that fails (its
customer, subscription and declined invoice live in the simulator) sends
invoice.created, invoice.finalized and invoice.payment_failed, which is
handled as in production: Stripe read, case opened, steps planned and the
first due ones run. Prints events/s from the commit to the last event
handled, per share of failed renewals and number of worker processes.
Needs PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.scratch_db import scratch_database  # noqa: E402
from recovery.config import DEFAULT_STRIPE_API_VERSION as API_VERSION  # noqa: E402
from recovery.db import insert_ignore_returning, make_engine  # noqa: E402
from recovery.inbox.receiver import inbox_row, parse_event  # noqa: E402
from recovery.models import WebhookEvent  # noqa: E402
from recovery.sim import StripeSim, objects  # noqa: E402
from recovery.sim.servers import start_wsgi_in_thread  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/12"
FINAL = ("processed", "ignored", "failed")


def backlog(sim: StripeSim, renewals: int, failed_share: float) -> list[dict]:
    """The events of `renewals` renewals, `failed_share` of them declined."""
    declines = ["insufficient_funds", "do_not_honor", "generic_decline", "expired_card"]
    failing = round(renewals * failed_share)
    for n in range(failing):
        sim.control(
            "POST",
            "/_sim/scenarios/failed_invoice",
            {"behavior": {"decline_code": declines[n % len(declines)]}},
        )
    failures = [e for e in sim.state.events if e["type"] == "invoice.payment_failed"]
    events = []
    for n in range(renewals):
        invoice = (
            failures[n]["data"]["object"]
            if n < failing
            else {**objects.example("invoice"), "id": objects.new_id("in"), "status": "paid"}
        )
        for kind in ("invoice.created", "invoice.finalized"):
            events.append(objects.event(sim.now(), kind, invoice, False, API_VERSION))
        events.append(
            failures[n]
            if n < failing
            else objects.event(sim.now(), "invoice.paid", invoice, False, API_VERSION)
        )
    return events


def store(db_url: str, events: list[dict]) -> float:
    """The events as the receiver stores them, in one commit; when it committed."""
    now = datetime.now(UTC)
    rows = []
    for event in events:
        payload = json.dumps(event).encode()
        rows.append(inbox_row(parse_event(payload), payload, now))
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_ignore_returning(conn, WebhookEvent, rows, "stripe_event_id")
    committed = time.perf_counter()
    engine.dispose()
    return committed


def count(db_url: str, statuses: tuple[str, ...], among: bool = True) -> int:
    """Inbox rows whose status is (or, `among=False`, is not) one of `statuses`."""
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        test = "IN" if among else "NOT IN"
        cur.execute(f"SELECT count(*) FROM webhook_events WHERE status {test} %s", (statuses,))
        (found,) = cur.fetchone()
    conn.close()
    return int(found)


def start_workers(n: int, concurrency: int, env: dict, workdir: Path) -> list[subprocess.Popen]:
    workers = []
    for index in range(n):
        command = [sys.executable, "-m", "recovery", "worker", "--concurrency", str(concurrency)]
        if index == 0:
            command.append("--beat")  # exactly one relay sweep per second
        workers.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    return workers


def stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def measure(
    renewals: int, failed_share: float, processes: int, concurrency: int, workdir: Path
) -> dict:
    redis.Redis.from_url(REDIS_URL).flushdb()
    sim = StripeSim()
    server = start_wsgi_in_thread(sim.wsgi)
    sim.state.base_url = server.url
    stored_events = backlog(sim, renewals, failed_share)
    with scratch_database() as db_url:
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "BROKER_URL": REDIS_URL,
            "STRIPE_API_BASE": server.url,
            "STRIPE_API_KEY": "sk_test_recovery_bench",
            # The simulator is local: Stripe's real budgets are not what is measured.
            "STRIPE_READ_RATE": "10000",
            "STRIPE_WRITE_RATE": "10000",
            "LOG_LEVEL": "WARNING",
            "OUTBOX_DIR": str(workdir / "outbox"),
            "PYTHONPATH": str(ROOT),
        }
        workers = start_workers(processes, concurrency, env, workdir)
        try:
            time.sleep(8)  # the pools are up and idle
            committed = store(db_url, stored_events)
            while count(db_url, FINAL, among=False):
                time.sleep(0.05)
            seconds = time.perf_counter() - committed
            failures = count(db_url, ("failed",))
        finally:
            stop(workers)
    server.stop()
    return {
        "workers": processes,
        "events": len(stored_events),
        "seconds": seconds,
        "per_second": len(stored_events) / seconds,
        "failed": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renewals", type=int, default=2000)
    parser.add_argument("--failed-share", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="recovery-bench-processing-"))
    print(f"{args.renewals} renewals, 3 events each; concurrency {args.concurrency} per worker")
    print(f"{'failed share':>12} {'workers':>8} {'events':>7} {'seconds':>8} {'events/s':>9}")
    for share in args.failed_share:
        for processes in args.workers:
            result = measure(args.renewals, share, processes, args.concurrency, workdir)
            print(
                f"{share:>12.0%} {result['workers']:>8} {result['events']:>7} "
                f"{result['seconds']:>8.1f} {result['per_second']:>9.0f}"
                + (f"  ({result['failed']} failed)" if result["failed"] else "")
            )
    print(
        f"\n{os.cpu_count()} cores, shared by the workers, PostgreSQL, Redis and the"
        " simulator (in this process, one request at a time)."
    )


if __name__ == "__main__":
    main()
