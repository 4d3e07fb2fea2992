"""Email benchmark: dunning emails rendered and delivered over SMTP by two
worker processes.

    python bench/emails.py [--emails 3000] [--workers 2]

A fresh PostgreSQL database gets that many open cases, each with its first
email queued in the outbox. One dispatch pass hands them to Celery on Redis;
two worker processes (solo pool) each claim, re-check, mint the recovery and
opt-out links, render both parts with CSS inlined, and deliver to a local
SMTP server (aiosmtpd, its own process). Prints emails/s from the dispatch to
the last one marked sent, and checks the SMTP server got exactly one email per
row. Needs PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.ingest import free_port  # noqa: E402
from bench.scratch_db import scratch_database  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/11"


def fill(db_url: str, count: int) -> None:
    now = datetime.now(UTC)
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO customers (stripe_customer_id, email, name, locale, created_at,"
            " updated_at) SELECT 'cus_' || g, 'customer' || g || '@example.com',"
            " 'Customer ' || g, (ARRAY['en-US', 'de-DE', 'ja-JP'])[g %% 3 + 1], %s, %s"
            " FROM generate_series(1, %s) g",
            (now, now, count),
        )
        cur.execute(
            "INSERT INTO recovery_cases (invoice_id, customer_id, stripe_customer_id, status,"
            " livemode, amount_due, currency, attempt_count, needs_authentication, category,"
            " decline_code, card_brand, card_last4, opened_at, updated_at)"
            " SELECT 'in_' || id, id, stripe_customer_id, 'open', false, 2900,"
            " (ARRAY['usd', 'eur', 'jpy'])[id %% 3 + 1], 1, false, 'retry',"
            " 'insufficient_funds', 'visa', '4242', %s, %s FROM customers",
            (now, now),
        )
        cur.execute(
            "INSERT INTO messages (key, case_id, step, template, status, attempts,"
            " next_attempt_at, created_at)"
            " SELECT 'case:' || id || ':email:retry:0', id, 'email:retry:0', 'payment_failed',"
            " 'pending', 0, %s, %s FROM recovery_cases",
            (now, now),
        )
        cur.execute("ANALYZE")
    conn.close()


def sent_count(db_url: str) -> int:
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM messages WHERE status = 'sent'")
        (count,) = cur.fetchone()
    conn.close()
    return count


def measure(count: int, workers: int) -> dict:
    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "smtp_sink.py"), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout.readline().strip() == "ready"
    try:
        with scratch_database() as db_url:
            fill(db_url, count)
            env = {
                **os.environ,
                "DATABASE_URL": db_url,
                "BROKER_URL": REDIS_URL,
                "STRIPE_API_KEY": "sk_test_bench",
                "STRIPE_WEBHOOK_SECRET": "whsec_bench",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(port),
                "SMTP_SECURITY": "none",
                "LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT),
            }
            os.environ.update(env)
            pool = [
                subprocess.Popen(
                    [sys.executable, "-m", "recovery", "worker", "--pool", "solo"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(workers)
            ]
            try:
                from recovery import clock, tasks
                from recovery.customers import outbox

                time.sleep(4)  # the workers connect
                started = time.perf_counter()
                outbox.dispatch(clock.now(), tasks.publish_messages)
                deadline = time.monotonic() + 300
                while (done := sent_count(db_url)) < count and time.monotonic() < deadline:
                    time.sleep(0.05)
                seconds = time.perf_counter() - started
            finally:
                for process in pool:
                    process.terminate()
                for process in pool:
                    process.wait(timeout=30)
                from recovery.db import reset_engine

                reset_engine()
    finally:
        received, _ = sink.communicate("", timeout=30)
        redis.Redis.from_url(REDIS_URL).flushdb()
    return {"sent": done, "received": int(received.strip()), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    r = measure(args.emails, args.workers)
    per_second = r["sent"] / r["seconds"]
    print(f"\n{os.cpu_count()} cores; {args.workers} worker processes; SMTP: aiosmtpd")
    print(f"sent {r['sent']} of {args.emails} in {r['seconds']:.1f} s: {per_second:.0f} emails/s")
    print(f"the SMTP server received {r['received']}")
    met = per_second >= 300 and r["received"] == r["sent"] == args.emails
    print(f"target (>= 300 emails/s, each exactly once): {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
