"""A database that stops answering (a partition, not a refused connection):
the web app answers 503 quickly, and recovers on its own when it is back."""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from recovery.config import get_settings
from recovery.sim.servers import start_asgi_in_thread
from recovery.web import make_app

from .conftest import reload_settings
from .factories import invoice_object, post_event, stripe_event

# What "quickly" means here: the app's own bound is 1.5 s.
PROMPT_SECONDS = 2.0


class StallingProxy:
    """A TCP proxy to PostgreSQL that can stop moving bytes, both ways, while
    keeping every connection open: to the app, the database went silent."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed:
                self.flowing.wait()
                ready, _, _ = select.select([source], [], [], 0.05)
                if not ready or not self.flowing.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()

    def close(self) -> None:
        self._closed = True
        self.flowing.set()
        self.listener.close()


@pytest.fixture
def stalling_app(db) -> Iterator[tuple[str, StallingProxy]]:
    parts = urlsplit(db)
    proxy = StallingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    reload_settings(DATABASE_URL=db.replace(parts.netloc, f"postgres@127.0.0.1:{proxy.port}"))
    server = start_asgi_in_thread(make_app(get_settings()))
    yield server.url, proxy
    proxy.close()
    server.stop()
    reload_settings(DATABASE_URL=db)


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        refused.close()
        return refused.code


def test_a_silent_database_is_a_quick_503_and_the_app_recovers_without_restart(stalling_app):
    url, proxy = stalling_app
    assert post_event(url, stripe_event("invoice.paid", invoice_object()))[0] == 200
    assert readyz(url) == 200

    proxy.flowing.clear()
    events = [stripe_event("invoice.paid", invoice_object()) for _ in range(20)]
    with ThreadPoolExecutor(max_workers=25) as pool:
        # The probes first: they find the pooled connection, now silent.
        probes = list(pool.map(lambda _: timed(lambda: readyz(url)), range(5)))
        posted = list(pool.map(lambda event: timed(lambda: post_event(url, event)[0]), events))
    assert {status for (status, _) in posted} == {503}
    assert {status for (status, _) in probes} == {503}
    assert max(seconds for _, seconds in posted + probes) < PROMPT_SECONDS

    proxy.flowing.set()
    deadline = time.monotonic() + 20
    while readyz(url) != 200:
        assert time.monotonic() < deadline, "the app did not recover"
        time.sleep(0.2)
    assert post_event(url, stripe_event("invoice.paid", invoice_object()))[0] == 200
