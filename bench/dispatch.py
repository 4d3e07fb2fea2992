"""Dispatch benchmark: claim due steps and hand them to Celery on Redis.

    python bench/dispatch.py [--sizes 10000 1000000] [--due-fraction 0.1]

For each size, a fresh PostgreSQL database gets that many cases with one
scheduled step each, a tenth of them due. Prints the time of one dispatch pass
(one claimed batch of DISPATCH_BATCH_SIZE steps, published) and claimed-and-
handed-off steps/s over all due steps. Needs PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.scratch_db import scratch_database  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/13"
NOW = datetime(2026, 11, 2, 12, tzinfo=UTC)


def fill(db_url: str, total: int, due: int) -> None:
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO recovery_cases (invoice_id, status, livemode, amount_due, currency,"
            " attempt_count, needs_authentication, opened_at, updated_at)"
            " SELECT 'in_' || g, 'open', false, 2000, 'usd', 1, false, %s, %s"
            " FROM generate_series(1, %s) g",
            (NOW, NOW, total),
        )
        cur.execute(
            "INSERT INTO recovery_attempts (case_id, kind, step, status, due_at, claims, tries,"
            " idempotency_key, created_at)"
            " SELECT id, 'email', 'email:bench:0', 'scheduled',"
            " CASE WHEN id <= %s THEN %s - (id %% 3600) * interval '1 second'"
            " ELSE %s + (id %% 20) * interval '1 day' END, 0, 0, 'bench-' || id, %s"
            " FROM recovery_cases",
            (due, NOW, NOW + timedelta(days=1), NOW),
        )
        cur.execute("ANALYZE")
    conn.close()


def measure(total: int, due_fraction: float) -> dict:
    os.environ.update(BROKER_URL=REDIS_URL, LOG_LEVEL="WARNING")
    with scratch_database() as db_url:
        os.environ["DATABASE_URL"] = db_url
        try:
            return _run(db_url, total, due_fraction)
        finally:
            redis.Redis.from_url(REDIS_URL).flushdb()


def _run(db_url: str, total: int, due_fraction: float) -> dict:
    from recovery import tasks
    from recovery.config import get_settings
    from recovery.db import reset_engine
    from recovery.engine import steps

    get_settings.cache_clear()
    reset_engine()
    due = int(total * due_fraction)
    fill(db_url, total, due)
    settings = get_settings()
    lease = timedelta(seconds=settings.step_lease_seconds)
    started = time.perf_counter()
    first = steps.claim_due(NOW, settings.dispatch_batch_size, lease)
    tasks.publish_step_batch(first)
    one_pass = time.perf_counter() - started
    handed = len(first) + steps.dispatch(NOW, settings, tasks.publish_step_batch)
    seconds = time.perf_counter() - started
    reset_engine()
    return {
        "total": total,
        "due": due,
        "handed": handed,
        "one_pass_ms": one_pass * 1000,
        "steps_per_second": handed / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--due-fraction", type=float, default=0.1)
    args = parser.parse_args()
    results = [measure(size, args.due_fraction) for size in args.sizes]
    print(f"\n{'cases':>10} {'due':>8} {'handed off':>10} {'one pass ms':>12} {'steps/s':>9}")
    for r in results:
        print(
            f"{r['total']:>10} {r['due']:>8} {r['handed']:>10} {r['one_pass_ms']:>12.1f} "
            f"{r['steps_per_second']:>9.0f}"
        )
    if len(results) > 1:
        ratio = results[-1]["one_pass_ms"] / results[0]["one_pass_ms"]
        print(
            f"\none pass at {results[-1]['total']:,} vs {results[0]['total']:,} cases: {ratio:.2f}x"
        )
        print(
            "targets: >= 5000 steps/s "
            f"{'met' if min(r['steps_per_second'] for r in results) >= 5000 else 'MISSED'}, "
            f"1M pass <= 1.2x 10k pass {'met' if ratio <= 1.2 else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
