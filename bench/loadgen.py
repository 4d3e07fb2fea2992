"""Load generator: distinct signed Stripe events over HTTP, from its own process.

    python bench/loadgen.py URL COUNT CONCURRENCY SECRET
    python bench/loadgen.py --get URL_PREFIX PATHS_FILE CONCURRENCY   (one GET per line)

Prints one JSON line: sent, accepted (2xx), errors, seconds, events/s, p50/p99 ms.
Requests are built and signed before the clock starts; the loop is bounded by
COUNT and by a 120 s deadline, and only talks to the given local URL.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from urllib.parse import urlsplit

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from recovery.inbox.receiver import signature_header  # noqa: E402
from recovery.sim import objects  # noqa: E402

DEADLINE_SECONDS = 120


def run_from(port: int, args: list[str], env: dict) -> dict:
    """Wait for a server on `port`, then run this load generator in its own
    process with `args`; its JSON line as a dict."""
    import subprocess
    from pathlib import Path

    from bench.ingest import wait_port

    wait_port(port)
    time.sleep(1.0)  # let every worker finish importing
    load = subprocess.run(
        [sys.executable, str(Path(__file__)), *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(load.stdout)


def build_requests(url: str, count: int, secret: str) -> list[bytes]:
    parts = urlsplit(url)
    invoice = objects.example("invoice")
    template = objects.event(
        int(time.time()), "invoice.payment_failed", invoice, False, "2026-10-28.endive"
    )
    requests = []
    now = int(time.time())
    for _ in range(count):
        template["id"] = f"evt_{uuid.uuid4().hex}"
        body = json.dumps(template).encode()
        head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Stripe-Signature: {signature_header(body, secret, now)}\r\n\r\n"
        ).encode()
        requests.append(head + body)
    return requests


async def worker(connection, host, port, queue, latencies: list[float], stats: dict, stop_at):
    reader, writer = connection
    while queue and time.monotonic() < stop_at:
        request = queue.pop()
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
        started = time.perf_counter()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats["errors"] += 1
            writer.close()
            reader = writer = None
            continue
        latencies.append(time.perf_counter() - started)
        stats["accepted" if 200 <= status < 300 else "refused"] += 1
        stats["status"][status] = stats["status"].get(status, 0) + 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def build_gets(prefix: str, paths: list[str]) -> list[bytes]:
    netloc = urlsplit(prefix).netloc
    return [f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\n\r\n".encode() for path in paths]


async def run(url: str, count: int, concurrency: int, secret: str) -> dict:
    return await run_requests(url, build_requests(url, count, secret), concurrency)


async def run_requests(url: str, requests: list[bytes], concurrency: int) -> dict:
    parts = urlsplit(url)
    latencies: list[float] = []
    stats = {"accepted": 0, "refused": 0, "errors": 0, "status": {}}
    # Connections are opened one by one before the clock starts, as a server
    # meets them over time: opened all at once, the first gunicorn worker to
    # wake accepts the whole burst and the others sit idle.
    connections = []
    for _ in range(concurrency):
        connections.append(await asyncio.open_connection(parts.hostname, parts.port))
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    stop_at = time.monotonic() + DEADLINE_SECONDS
    await asyncio.gather(
        *(
            worker(connection, parts.hostname, parts.port, requests, latencies, stats, stop_at)
            for connection in connections
        )
    )
    seconds = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "sent": len(latencies) + stats["errors"],
        **stats,
        "seconds": round(seconds, 3),
        "events_per_second": round(len(latencies) / seconds, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


if __name__ == "__main__":
    if sys.argv[1] == "--get":
        prefix, paths_file, concurrency = sys.argv[2], sys.argv[3], int(sys.argv[4])
        with open(paths_file) as listed:
            gets = build_gets(prefix, listed.read().split())
        print(json.dumps(asyncio.run(run_requests(prefix, gets, concurrency))))
    else:
        url, count, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        print(json.dumps(asyncio.run(run(url, count, concurrency, sys.argv[4]))))
