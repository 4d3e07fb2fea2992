"""Webhook ingest benchmark: our receiver vs a naive one, same machine, same run.

    python bench/ingest.py [--events 20000] [--naive-events 5000] [--workers 2]
                           [--concurrency 32]

Each receiver runs under gunicorn against a fresh PostgreSQL database; the load
generator (bench/loadgen.py) runs in its own process and sends distinct signed
events. Prints events/s, p50/p99 latency, rows stored vs accepted, the ratio.
Needs PostgreSQL (TEST_PG_ADMIN_URL, default postgres@127.0.0.1/test) and, for
the naive receiver's Celery delay(), Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_from  # noqa: E402
from bench.scratch_db import scratch_database  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/14"
SECRET = "whsec_bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def run_receiver(
    name: str,
    app: str,
    db_url: str,
    events: int,
    workers: int,
    concurrency: int,
    gunicorn_args: list[str],
) -> dict:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://"))
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE webhook_events RESTART IDENTITY"))
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "BROKER_URL": REDIS_URL,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_API_KEY": "sk_test_bench",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            app,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--backlog",
            "2048",
            "--log-level",
            "warning",
            *gunicorn_args,
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        result = run_from(
            port,
            [f"http://127.0.0.1:{port}/webhooks/stripe", str(events), str(concurrency), SECRET],
            env,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    with engine.connect() as conn:
        result["stored"] = conn.execute(text("SELECT count(*) FROM webhook_events")).scalar()
    engine.dispose()
    result["lost"] = result["accepted"] - result["stored"]
    result["name"] = name
    return result


def _both(args, db_url: str) -> tuple[dict, dict]:
    ours = run_receiver(
        "recovery (gunicorn+uvicorn, ASGI, group commit)",
        "recovery.asgi:app",
        db_url,
        args.events,
        args.workers,
        args.concurrency,
        ["--worker-class", "recovery.serving.Worker"],
    )
    naive = run_receiver(
        "naive (Flask, construct_event, ORM, delay())",
        "bench.naive_receiver:app",
        db_url,
        args.naive_events,
        args.workers,
        args.concurrency,
        [],
    )
    return ours, naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--naive-events", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    with scratch_database() as db_url:
        try:
            ours, naive = _both(args, db_url)
        finally:
            redis.Redis.from_url(REDIS_URL).flushdb()

    print(
        f"\n{os.cpu_count()} cores; {args.workers} gunicorn workers each; load generator: "
        f"{args.concurrency} connections in its own process\n"
    )
    print(
        f"{'receiver':<48} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'accepted':>9} {'stored':>7} {'lost':>5} {'errors':>6}"
    )
    for r in (ours, naive):
        print(
            f"{r['name']:<48} {r['events_per_second']:>9.0f} {r['p50_ms']:>7.2f} "
            f"{r['p99_ms']:>7.2f} {r['accepted']:>9} {r['stored']:>7} {r['lost']:>5} "
            f"{r['errors'] + r['refused']:>6}"
        )
    ratio = ours["events_per_second"] / naive["events_per_second"]
    print(f"\nratio: {ratio:.1f}x the naive receiver")
    checks = {
        ">= 4000 events/s": ours["events_per_second"] >= 4000,
        "p99 <= 20 ms": ours["p99_ms"] <= 20,
        ">= 5x naive": ratio >= 5,
        "0 lost": ours["lost"] == 0 and ours["errors"] == 0 and ours["refused"] == 0,
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in checks.items()))


if __name__ == "__main__":
    main()
