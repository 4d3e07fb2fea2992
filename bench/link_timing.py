"""Can a stopwatch tell a forged link token from an expired or revoked one?

    python bench/link_timing.py [--requests 1000] [--rounds 3]

A fresh PostgreSQL database gets open cases with expired and revoked "pay"
links. The web app runs as `recovery serve` (one gunicorn worker, uvicorn);
one client on one keep-alive connection clicks, interleaved, a forged token,
an expired one and a revoked one, `--requests` of each per round, and times
each answer. Prints the median per kind and how far the dead links' medians
are from the forged one's (target: under 10%). Needs PostgreSQL.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
from psycopg2.extras import execute_values

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, wait_port  # noqa: E402
from bench.links import web_env  # noqa: E402
from bench.scratch_db import scratch_database  # noqa: E402
from recovery.customers.links import new_token, token_hash  # noqa: E402

KINDS = ("forged", "expired", "revoked")


def fill(db_url: str, count: int) -> dict[str, list[str]]:
    """`count` expired and `count` revoked links, on as many open cases."""
    now = datetime.now(UTC)
    tokens = {kind: [new_token() for _ in range(count)] for kind in KINDS}
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO recovery_cases (invoice_id, status, livemode, amount_due, currency,"
            " attempt_count, needs_authentication, hosted_invoice_url, opened_at, updated_at)"
            " SELECT 'in_' || g, 'open', false, 2000, 'usd', 1, false,"
            " 'https://invoice.stripe.com/i/acct_bench/test_' || g, %s, %s"
            " FROM generate_series(1, %s) g",
            (now, now, 2 * count),
        )
        rows = [
            (n + 1, token_hash(token), "pay", now - timedelta(days=1), None, 0, now)
            for n, token in enumerate(tokens["expired"])
        ] + [
            (count + n + 1, token_hash(token), "pay", now + timedelta(days=14), now, 0, now)
            for n, token in enumerate(tokens["revoked"])
        ]
        execute_values(
            cur,
            "INSERT INTO recovery_links (case_id, token_hash, purpose, expires_at, revoked_at,"
            " click_count, created_at) VALUES %s",
            rows,
        )
        cur.execute("ANALYZE")
    conn.close()
    return tokens


def click(conn: http.client.HTTPConnection, token: str) -> float:
    started = time.perf_counter()
    conn.request("GET", f"/r/{token}")
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - started
    if response.status != 404:
        raise RuntimeError(f"a dead link answered {response.status}")
    return elapsed


def measure(requests: int, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with scratch_database() as db_url:
        tokens = fill(db_url, requests * rounds)
        port = free_port()
        env = web_env(db_url)
        server = subprocess.Popen(
            [sys.executable, "-m", "recovery", "serve", "--port", str(port), "--workers", "1"],
            cwd=ROOT,
            env=env,
        )
        try:
            wait_port(port)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for warm in range(200):  # connection pool, statement cache, page cache
                click(conn, new_token() if warm % 2 else tokens["expired"][-1 - warm])
            for n in range(requests * rounds):
                # Interleaved, so drift in the machine's load hits every kind alike.
                for kind in KINDS:
                    token = new_token() if kind == "forged" else tokens[kind][n]
                    times[kind].append(click(conn, token))
            conn.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times = measure(args.requests, args.rounds)
    medians = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
    print(f"\n{args.requests * args.rounds} clicks of each kind, interleaved, one connection")
    for kind in KINDS:
        print(f"  {kind:8} median {medians[kind]:.3f} ms")
    worst = 0.0
    for kind in KINDS[1:]:
        difference = abs(medians[kind] - medians["forged"]) / medians["forged"]
        worst = max(worst, difference)
        print(f"  {kind} vs forged: {difference:.1%}")
    print(f"target (median difference under 10%): {'met' if worst < 0.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
