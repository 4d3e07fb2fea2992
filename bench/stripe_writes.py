"""Stripe write-rate benchmark: a retry backlog worked by real Celery workers.

    python bench/stripe_writes.py [--cases 600] [--rate 20] [--workers 2] [--concurrency 4]

The Stripe-compatible server runs in this process with Stripe's write limit
set to the same rate as STRIPE_WRITE_RATE, so any write our shared limiter lets
through too early is answered 429. A fresh PostgreSQL database gets one open
case per failed invoice, each with a retry due now; one dispatch pass hands the
backlog to the workers over Redis. Prints the sustained write rate the server
saw (as a share of the limit) and the 429s. Needs PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.scratch_db import scratch_database  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/12"


def sim_call(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def open_backlog(db_url: str, sim_url: str, cases: int) -> None:
    """Failed invoices in the server; an open case with a due retry for each."""
    rows = []
    for n in range(cases):
        # Half the cards pay on the retry, half decline again: both are writes.
        behavior = {"decline_code": "insufficient_funds"}
        if n % 2:
            behavior["succeed_after"] = int(time.time()) + 1
        made = sim_call(
            sim_url,
            "/_sim/scenarios/failed_invoice",
            {"behavior": behavior, "card": {"fingerprint": f"fp{n}"}},
        )
        rows.append((made["invoice"], made["customer"], made["payment_method"], f"fp{n}"))
    now = datetime.now(UTC)
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        for invoice_id, customer_id, pm_id, fingerprint in rows:
            cur.execute(
                "INSERT INTO recovery_cases (invoice_id, stripe_customer_id, payment_method_id,"
                " card_fingerprint, card_brand, status, livemode, amount_due, currency,"
                " attempt_count, needs_authentication, decline_code, category, mode,"
                " opened_at, updated_at, first_failed_at, last_failure_at)"
                " VALUES (%s, %s, %s, %s, 'visa', 'open', false, 2000, 'usd', 1, false,"
                " 'insufficient_funds', 'retry', 'take_over', %s, %s, %s, %s) RETURNING id",
                (invoice_id, customer_id, pm_id, fingerprint, now, now, now, now),
            )
            case_id = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO recovery_attempts (case_id, kind, step, status, due_at, claims,"
                " tries, idempotency_key, created_at)"
                " VALUES (%s, 'retry', 'retry:1', 'scheduled', %s, 0, 0, %s, %s)",
                (case_id, now, f"recovery-{case_id}-retry:1", now),
            )
    conn.close()


def step_outcomes(db_url: str) -> dict[str, int]:
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT coalesce(outcome, status) || coalesce(' (' || last_error || ')', ''),"
            " count(*) FROM recovery_attempts WHERE step = 'retry:1' GROUP BY 1"
        )
        found = dict(cur.fetchall())
    conn.close()
    return found


def start_workers(count: int, concurrency: int, env: dict) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "recovery", "worker", "--concurrency", str(concurrency)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def sustained(writes: list[tuple[float, int]], rate: float) -> tuple[float, int, float]:
    """Writes/s after the first second (the bucket starts full, so the first
    second may carry a burst of `rate` on top), the 429s, and the span."""
    times = sorted(t for t, _ in writes)
    if len(times) < 2:
        return 0.0, 0, 0.0
    start = times[0] + 1.0
    later = [t for t in times if t >= start]
    span = later[-1] - start if len(later) > 1 else 0.0
    limited = sum(1 for _, status in writes if status == 429)
    return ((len(later) - 1) / span if span else 0.0), limited, times[-1] - times[0]


def measure(cases: int, rate: int, workers: int, concurrency: int) -> dict:
    from recovery.sim import StripeSim
    from recovery.sim.servers import start_wsgi_in_thread

    redis.Redis.from_url(REDIS_URL).flushdb()
    sim = StripeSim()
    server = start_wsgi_in_thread(sim.wsgi)
    sim.state.base_url = server.url
    try:
        with scratch_database() as db_url:
            env = {
                **os.environ,
                "DATABASE_URL": db_url,
                "BROKER_URL": REDIS_URL,
                "STRIPE_API_BASE": server.url,
                "STRIPE_API_KEY": "sk_test_bench",
                "STRIPE_WEBHOOK_SECRET": "whsec_bench",
                "STRIPE_WRITE_RATE": str(rate),
                "LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT),
            }
            os.environ.update(env)
            open_backlog(db_url, server.url, cases)
            sim_call(server.url, "/_sim/rate_limit", {"writes_per_second": rate})
            sim.state.writes.clear()
            pool = start_workers(workers, concurrency, env)
            try:
                from recovery import clock, tasks
                from recovery.config import get_settings
                from recovery.engine import steps

                time.sleep(3)  # the workers connect
                steps.dispatch(clock.now(), get_settings(), tasks.publish_step_batch)
                deadline = time.monotonic() + cases / rate * 3 + 60
                while len(sim.state.writes) < cases and time.monotonic() < deadline:
                    time.sleep(0.5)
                time.sleep(2)  # late writes, if any
            finally:
                for process in pool:
                    process.terminate()
                for process in pool:
                    process.wait(timeout=30)
            outcomes = step_outcomes(db_url)
            from recovery.db import reset_engine

            reset_engine()
    finally:
        server.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
    per_second, limited, span = sustained(sim.state.writes, rate)
    return {
        "cases": cases,
        "writes": len(sim.state.writes),
        "span_s": span,
        "per_second": per_second,
        "share": per_second / rate,
        "limited": limited,
        "outcomes": outcomes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    r = measure(args.cases, args.rate, args.workers, args.concurrency)
    print(
        f"\n{r['cases']} due retries, {args.workers} workers x {args.concurrency}, "
        f"limit {args.rate:g} writes/s"
    )
    print(f"writes seen by Stripe: {r['writes']} over {r['span_s']:.1f} s")
    print(f"sustained after the first second: {r['per_second']:.2f} writes/s ({r['share']:.1%})")
    print(f"429 answers: {r['limited']}")
    print("retries: " + ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items())))
    met = r["share"] >= 0.95 and r["limited"] == 0 and r["writes"] >= r["cases"]
    print(f"target (>= 95% of the limit, no 429): {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
