"""Outbound webhook benchmark: deliveries per second to a local receiver, and
the engine's retries per second with and without 10,000 deliveries pending to
a dead endpoint, in one run.

    python bench/outbound.py [--deliveries 3000] [--endpoints 4] [--retries 400]
                             [--dead 10000]

1. A fresh PostgreSQL database holds `--deliveries` events owed to each of
   `--endpoints` endpoints on a local HTTP receiver (answers 200 at once); a
   `recovery worker --queue webhooks` on Redis delivers them, dispatched every
   0.2 s. Prints deliveries/s, all endpoints together.
2. `--retries` open cases with a retry due now (the Stripe-compatible server
   in this process, its write limit off), worked by a `recovery worker`:
   retries/s, first alone, then again on fresh cases while `--dead`
   deliveries to an endpoint that refuses connections are worked by the
   webhooks worker beside it. Needs PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.scratch_db import scratch_database  # noqa: E402
from bench.stripe_writes import open_backlog  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/11"


def receiver() -> tuple[ThreadingHTTPServer, list[int]]:
    hits: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers.get("content-length", 0)))
            hits.append(1)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


def sql(db_url: str, statement: str, args: tuple = ()) -> list:
    conn = psycopg2.connect(db_url.replace("postgresql://", "postgres://"))
    with conn, conn.cursor() as cur:
        cur.execute(statement, args)
        rows = cur.fetchall() if cur.description else []
    conn.close()
    return rows


def owe(db_url: str, urls: list[str], events: int) -> None:
    """`events` announcements, each owed to every endpoint in `urls`."""
    for url in urls:
        sql(
            db_url,
            "INSERT INTO endpoints (url, secret, status, created_at, updated_at)"
            " VALUES (%s, 'whsec_YmVuY2htYXJrYmVuY2htYXJrYmVuY2htYXJr', 'enabled', now(), now())",
            (url,),
        )
    first = sql(db_url, "SELECT coalesce(max(id), 0) FROM announcements")[0][0]
    sql(
        db_url,
        "INSERT INTO announcements (public_id, type, data, created_at)"
        " SELECT 'msg_bench_' || (%s + g), 'case.paused', '{\"sequence\": 1}', now()"
        " FROM generate_series(1, %s) g",
        (first, events),
    )
    sql(
        db_url,
        "INSERT INTO deliveries (endpoint_id, announcement_id, status, attempts,"
        " next_attempt_at, created_at)"
        " SELECT e.id, a.id, 'pending', 0, now(), now() FROM endpoints e, announcements a"
        " WHERE e.url = ANY(%s) AND a.id > %s",
        (urls, first),
    )
    sql(db_url, "ANALYZE")


def worker(env: dict, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recovery", "worker", *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


class Dispatcher(threading.Thread):
    """Beat's dispatch-deliveries, every 0.2 s instead of 2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopped = threading.Event()

    def run(self) -> None:
        from recovery import clock, tasks
        from recovery.business import deliveries

        while not self.stopped.is_set():
            deliveries.dispatch(clock.now(), tasks.publish_deliveries)
            self.stopped.wait(0.2)


def delivered_per_second(db_url: str, env: dict, events: int, endpoints: int) -> float:
    server, hits = receiver()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    owe(db_url, [f"{url}/{n}" for n in range(endpoints)], events)
    total = events * endpoints
    pool = [worker(env, "--queue", "webhooks")]
    dispatcher = Dispatcher()
    try:
        time.sleep(3)  # the worker connects
        started = time.perf_counter()
        dispatcher.start()
        deadline = time.monotonic() + 600
        while len(hits) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        dispatcher.stopped.set()
        stop(pool)
        server.shutdown()
    return len(hits) / seconds


def retries_per_second(db_url: str, sim_url: str, env: dict, cases: int) -> float:
    from recovery import clock, tasks
    from recovery.config import get_settings
    from recovery.engine import steps

    before = sql(db_url, "SELECT count(*) FROM recovery_attempts WHERE status = 'done'")[0][0]
    open_backlog(db_url, sim_url, cases)
    started = time.perf_counter()
    steps.dispatch(clock.now(), get_settings(), tasks.publish_step_batch)
    deadline = time.monotonic() + 600
    done = 0
    while done < cases and time.monotonic() < deadline:
        time.sleep(0.1)
        done = (
            sql(db_url, "SELECT count(*) FROM recovery_attempts WHERE status = 'done'")[0][0]
            - before
        )
    return done / (time.perf_counter() - started)


def measure(events: int, endpoints: int, cases: int, dead: int) -> dict:
    from recovery.sim import StripeSim
    from recovery.sim.servers import start_wsgi_in_thread

    redis.Redis.from_url(REDIS_URL).flushdb()
    sim = StripeSim()
    stripe_server = start_wsgi_in_thread(sim.wsgi)
    sim.state.base_url = stripe_server.url
    result: dict = {}
    try:
        with scratch_database() as db_url:
            env = {
                **os.environ,
                "DATABASE_URL": db_url,
                "BROKER_URL": REDIS_URL,
                "STRIPE_API_BASE": stripe_server.url,
                "STRIPE_API_KEY": "sk_test_bench",
                "STRIPE_WEBHOOK_SECRET": "whsec_bench",
                "STRIPE_WRITE_RATE": "10000",
                "STRIPE_READ_RATE": "10000",
                "OUTBOUND_ALLOWED_NETWORKS": "127.0.0.0/8",
                "LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT),
            }
            os.environ.update(env)
            from recovery.config import get_settings
            from recovery.db import reset_engine

            get_settings.cache_clear()
            reset_engine()
            result["delivered_per_second"] = delivered_per_second(db_url, env, events, endpoints)
            engine = [worker(env, "--concurrency", "4")]
            try:
                time.sleep(3)
                result["retries_alone"] = retries_per_second(db_url, stripe_server.url, env, cases)
                # An endpoint nothing listens on: every connection is refused.
                owe(db_url, ["http://127.0.0.1:9/dead"], dead)
                beside = [worker(env, "--queue", "webhooks")]
                dispatcher = Dispatcher()
                try:
                    time.sleep(3)
                    dispatcher.start()
                    result["retries_beside_dead"] = retries_per_second(
                        db_url, stripe_server.url, env, cases
                    )
                    result["dead_attempted"] = sql(
                        db_url,
                        "SELECT count(*) FROM deliveries d JOIN endpoints e"
                        " ON e.id = d.endpoint_id WHERE e.url LIKE '%%/dead' AND d.attempts > 0",
                    )[0][0]
                finally:
                    dispatcher.stopped.set()
                    stop(beside)
            finally:
                stop(engine)
            reset_engine()
    finally:
        stripe_server.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--retries", type=int, default=400)
    parser.add_argument("--dead", type=int, default=10_000)
    args = parser.parse_args()
    r = measure(args.deliveries, args.endpoints, args.retries, args.dead)
    print(
        f"\ndeliveries to a local receiver ({args.endpoints} endpoints x {args.deliveries}):"
        f" {r['delivered_per_second']:.0f}/s"
    )
    print(f"engine retries, alone: {r['retries_alone']:.1f}/s")
    print(
        f"engine retries, {args.dead:,} deliveries pending to a dead endpoint beside:"
        f" {r['retries_beside_dead']:.1f}/s ({r['dead_attempted']:,} of those tried meanwhile)"
    )
    ratio = r["retries_beside_dead"] / r["retries_alone"]
    print(f"retries/s beside the dead endpoint vs alone: {ratio:.2f}x")


if __name__ == "__main__":
    main()
