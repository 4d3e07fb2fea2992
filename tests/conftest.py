"""Test fixtures on real services: a fresh PostgreSQL database per run (migrated
once), Redis, the Stripe-compatible server and the receiver over real HTTP.

When CI=true (or RECOVERY_REQUIRE_SERVICES=1) a missing PostgreSQL or Redis
fails the run instead of skipping the tests that need it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("TEST_REDIS_PORT", "6379"))
REQUIRE_SERVICES = os.environ.get("CI") == "true" or os.environ.get("RECOVERY_REQUIRE_SERVICES")
WEBHOOK_SECRET = "whsec_test_current"
OLD_WEBHOOK_SECRET = "whsec_test_previous"

# The environment every test process (and the workers they start) sees.
BASE_ENV = {
    "RECOVERY_ENV": "development",
    "STRIPE_API_KEY": "sk_test_recovery_tests",
    "STRIPE_WEBHOOK_SECRET": f"{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "EVENT_MAX_ATTEMPTS": "3",
    # The file sink, when a test sends email without an SMTP server.
    "OUTBOX_DIR": tempfile.mkdtemp(prefix="recovery-outbox-"),
}


def _missing(what: str) -> None:
    message = f"{what} is not reachable"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and services are required (CI=true)", pytrace=False)
    pytest.skip(message)


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def reload_settings(**overrides: str) -> None:
    """Apply BASE_ENV plus overrides to os.environ and drop every cached object."""
    from recovery import stripe_api
    from recovery.config import get_settings
    from recovery.db import reset_engine

    os.environ.update({**BASE_ENV, **overrides})
    get_settings.cache_clear()
    stripe_api.client.cache_clear()
    reset_engine()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    try:
        admin = psycopg2.connect(
            PG_ADMIN_URL.replace("postgresql://", "postgres://"), connect_timeout=3
        )
    except psycopg2.OperationalError:
        _missing("PostgreSQL")
    admin.autocommit = True
    name = f"recovery_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from recovery.db import upgrade

    upgrade(url)
    yield url
    from recovery.db import reset_engine

    reset_engine()
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _reachable(REDIS_HOST, REDIS_PORT):
        _missing("Redis")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/15"


@pytest.fixture
def db(pg_url) -> Iterator[str]:
    """PostgreSQL with empty tables, configured as DATABASE_URL."""
    reload_settings(DATABASE_URL=pg_url, BROKER_URL="memory://")
    from recovery.db import get_engine
    from recovery.models import Base

    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield pg_url


@pytest.fixture
def sim() -> Iterator:
    """The Stripe-compatible server on a free port, with STRIPE_API_BASE pointing at it."""
    from recovery import clock
    from recovery.sim import StripeSim
    from recovery.sim.servers import start_wsgi_in_thread

    # Its time follows the tests' clock, as the demo's follows the demo's.
    stripe_sim = StripeSim(clock=clock.now)
    server = start_wsgi_in_thread(stripe_sim.wsgi)
    url = server.url
    stripe_sim.state.base_url = url
    stripe_sim.url = url
    os.environ["STRIPE_API_BASE"] = url
    from recovery import stripe_api
    from recovery.config import get_settings

    get_settings.cache_clear()
    stripe_api.client.cache_clear()
    yield stripe_sim
    server.stop()
    os.environ.pop("STRIPE_API_BASE", None)
    get_settings.cache_clear()
    stripe_api.client.cache_clear()


@pytest.fixture
def receiver(db) -> Iterator[str]:
    """The webhook receiver over real HTTP; yields its base URL."""
    from recovery.config import get_settings
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    server = start_asgi_in_thread(make_app(get_settings()))
    yield server.url
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_redis() -> Iterator:
    """A Redis server of our own that a test may stop and start again."""

    class PrivateRedis:
        def __init__(self) -> None:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.process: subprocess.Popen | None = None

        def start(self) -> None:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not _reachable("127.0.0.1", self.port):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

        def stop(self) -> None:
            if self.process is not None:
                self.process.terminate()
                self.process.wait(timeout=10)
                self.process = None

    if not _reachable(REDIS_HOST, REDIS_PORT):
        _missing("Redis")
    server = PrivateRedis()
    yield server
    server.stop()


class SmtpSink:
    """A real SMTP server (aiosmtpd) that keeps what it receives; `refuse`
    queues replies to give instead of accepting (e.g. "451 4.3.0 try later")."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.refuse: list[str] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        import email
        from email import policy

        if self.refuse:
            return self.refuse.pop(0)
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append((envelope.rcpt_tos, message))
        return "250 OK"

    def env(self) -> dict[str, str]:
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port), "SMTP_SECURITY": "none"}


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """An SMTP server on a free port, configured as SMTP_HOST for the test."""
    from recovery.config import get_settings

    sink = SmtpSink()
    sink.controller.start()
    previous = {key: os.environ.get(key) for key in sink.env()}
    os.environ.update(sink.env())
    get_settings.cache_clear()
    yield sink
    sink.controller.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()
