"""Link-redemption benchmark: customers clicking recovery links.

    python bench/links.py [--links 20000] [--workers 2] [--concurrency 32]

A fresh PostgreSQL database gets that many open cases, each with a live "pay"
link (the invoice's hosted page is known, as it is once Stripe has told us of
the failure). The web app runs as `recovery serve` (gunicorn, uvicorn worker); a separate
load process clicks every link once and follows none of the redirects. Prints
redirects/s, p50/p99 latency, the answers by status, and checks every click
was recorded. The per-client click limit is lifted: every click here comes
from one address. Needs PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
from psycopg2.extras import execute_values

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port  # noqa: E402
from bench.loadgen import run_from  # noqa: E402
from bench.scratch_db import scratch_database  # noqa: E402
from recovery.customers.links import new_token, token_hash  # noqa: E402


def fill(db_url: str, count: int) -> list[str]:
    now = datetime.now(UTC)
    tokens = [new_token() for _ in range(count)]
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO recovery_cases (invoice_id, status, livemode, amount_due, currency,"
            " attempt_count, needs_authentication, hosted_invoice_url, opened_at, updated_at)"
            " SELECT 'in_' || g, 'open', false, 2000, 'usd', 1, false,"
            " 'https://invoice.stripe.com/i/acct_bench/test_' || g, %s, %s"
            " FROM generate_series(1, %s) g",
            (now, now, count),
        )
        execute_values(
            cur,
            "INSERT INTO recovery_links (case_id, token_hash, purpose, expires_at, click_count,"
            " created_at) VALUES %s",
            [
                (n + 1, token_hash(token), "pay", now + timedelta(days=14), 0, now)
                for n, token in enumerate(tokens)
            ],
        )
        cur.execute("ANALYZE")
    conn.close()
    return tokens


def clicks_recorded(db_url: str) -> int:
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM recovery_links WHERE click_count = 1")
        (count,) = cur.fetchone()
    conn.close()
    return count


def web_env(db_url: str) -> dict[str, str]:
    """The web app's environment for a benchmark: this database, no click limit
    (every click comes from one address), quiet logs."""
    return {
        **os.environ,
        "DATABASE_URL": db_url,
        "STRIPE_API_KEY": "sk_test_bench",
        "STRIPE_WEBHOOK_SECRET": "whsec_bench",
        "LINK_CLICKS_PER_MINUTE": "100000",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }


def measure(count: int, workers: int, concurrency: int) -> dict:
    with scratch_database() as db_url:
        tokens = fill(db_url, count)
        port = free_port()
        env = web_env(db_url)
        # The production command: gunicorn with the uvicorn worker.
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "recovery",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            env=env,
        )
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listed:
            listed.write("\n".join(f"/r/{token}" for token in tokens))
        try:
            result = run_from(
                port, ["--get", f"http://127.0.0.1:{port}", listed.name, str(concurrency)], env
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
            os.unlink(listed.name)
        result["recorded"] = clicks_recorded(db_url)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    r = measure(args.links, args.workers, args.concurrency)
    redirects = r["status"].get("303", 0)
    per_second = redirects / r["seconds"] if r["seconds"] else 0.0
    print(
        f"\n{os.cpu_count()} cores; {args.workers} gunicorn workers (uvicorn); "
        f"{args.concurrency} connections"
    )
    print(f"clicks: {r['sent']}, answers by status: {r['status']}, errors: {r['errors']}")
    print(f"redirects/s: {per_second:.0f}   p50 {r['p50_ms']} ms   p99 {r['p99_ms']} ms")
    print(f"clicks recorded: {r['recorded']} of {args.links}")
    met = per_second >= 1000 and r["recorded"] == args.links and redirects == args.links
    print(f"target (>= 1,000 redirects/s, every click recorded): {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
