"""Test fixtures on real services: a fresh PostgreSQL database per run (migrated
once), Redis, the Stripe-compatible server and the receiver over real HTTP.

When CI=true (or RECOVERY_REQUIRE_SERVICES=1) a missing PostgreSQL or Redis
fails the run instead of skipping the tests that need it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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
    # The simulator is local: the read budget is tested on its own.
    "STRIPE_READ_RATE": "10000",
    # The file sink, when a test sends email without an SMTP server.
    "OUTBOX_DIR": tempfile.mkdtemp(prefix="recovery-outbox-"),
}


# Redis keeps 16 databases; each worker takes its own, from 15 down.
MOST_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`--numprocesses=auto`: one worker per core, up to MOST_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MOST_WORKERS))


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
    from recovery import ratelimit, stripe_api
    from recovery.config import get_settings
    from recovery.db import reset_engine

    os.environ.update({**BASE_ENV, **overrides})
    get_settings.cache_clear()
    stripe_api.client.cache_clear()
    ratelimit.shared_bucket.cache_clear()
    ratelimit.read_bucket.cache_clear()
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
def pg_engine(pg_url):
    from recovery.db import make_engine

    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(pg_engine) -> Iterator:
    """A session inside a transaction that is rolled back after the test: code
    that takes a session commits to savepoints, and nothing it wrote remains."""
    from sqlalchemy.orm import Session

    conn = pg_engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield session
    session.close()
    outer.rollback()
    conn.close()


@pytest.fixture
def settings():
    """The tests' settings, handed to engine code as production hands them."""
    from recovery.config import load_settings

    return load_settings(BASE_ENV)


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _reachable(REDIS_HOST, REDIS_PORT):
        _missing("Redis")
    # The worker's own database: gw0 15, gw1 14, ...
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{15 - worker}"


@pytest.fixture
def flushed_redis(redis_url):
    """The tests' own Redis database, empty before and after."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()


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
def sqlite(tmp_path) -> Iterator[Path]:
    """SQLite, the embedded default, migrated and configured as DATABASE_URL;
    yields the directory it is in."""
    from recovery.db import upgrade

    url = f"sqlite:///{tmp_path / 'recovery.sqlite3'}"
    upgrade(url)
    reload_settings(DATABASE_URL=url, BROKER_URL="memory://", OUTBOX_DIR=str(tmp_path / "out"))
    yield tmp_path
    reload_settings()


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


def _processes() -> Iterator[tuple[str, str, int, int]]:
    """Each process as /proc tells it: "pid (name)", state, parent, group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended while we looked
            continue
        name_end = text.rindex(")")
        state, parent, group = text[name_end + 2 :].split()[:3]
        yield text[: name_end + 1], state, int(parent), int(group)


def running_in_group(group: int) -> list[str]:
    """Live processes in a process group (zombies awaiting a reaper do not run)."""
    return [who for who, state, _, of in _processes() if of == group and state != "Z"]


def groups_of_children(parent: int) -> set[int]:
    """The process groups of a process's children."""
    return {of for _, _, child_of, of in _processes() if child_of == parent}


def left_in_group(group: int, seconds: float = 20) -> list[str]:
    """What still runs in a process group once it has had `seconds` to end."""
    deadline = time.monotonic() + seconds
    while running_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running_in_group(group)


def read_until(stream: Iterator[str], text: str, what: str) -> None:
    """Read a child's output up to a line holding `text`."""
    for line in stream:
        if text in line:
            return
    raise AssertionError(f"{what} did not start")


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
    queues replies to give instead of accepting (e.g. "451 4.3.0 try later");
    `cut` is how many messages to take and then drop the connection before
    answering; `smtputf8` offers SMTPUTF8 for internationalized addresses."""

    def __init__(self, smtputf8: bool = False) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.refuse: list[str] = []
        self.cut = 0
        self.port = free_port()
        self.controller = Controller(
            self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=smtputf8
        )

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        import email
        from email import policy

        if self.refuse:
            return self.refuse.pop(0)
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append((envelope.rcpt_tos, message))
        if self.cut:
            self.cut -= 1
            server.transport.close()  # taken, and the answer never comes
        return "250 OK"

    def env(self) -> dict[str, str]:
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port), "SMTP_SECURITY": "none"}


@pytest.fixture
def smtp_sink(request) -> Iterator[SmtpSink]:
    """An SMTP server on a free port, configured as SMTP_HOST for the test
    (parametrize indirectly with True for one that offers SMTPUTF8)."""
    from recovery.config import get_settings

    sink = SmtpSink(smtputf8=getattr(request, "param", False))
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


# -- the whole stack: simulator → signed webhooks → receiver → engine ------------------

T0 = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)


class Stack:
    """The simulator delivering signed events to the receiver over HTTP, and
    passes of the engine on the tests' clock."""

    def __init__(self, sim, receiver: str, start: datetime | None):
        from .factories import sim_post

        self.sim, self.receiver = sim, receiver
        sim_post(
            sim.url,
            "/_sim/webhook_endpoints",
            {"url": f"{receiver}/webhooks/stripe", "secret": WEBHOOK_SECRET},
        )
        if start is not None:
            self.at(start)

    def at(self, instant: datetime) -> None:
        """Move the clock, which the simulator follows too."""
        from recovery import clock

        clock.set_now(instant)

    def tick(self, instant: datetime | None = None):
        """One pass of the engine (events, steps, emails), in this process."""
        from recovery.config import get_settings
        from recovery.engine import scheduler

        if instant is not None:
            self.at(instant)
        self.sim.flush()
        return scheduler.run_pass(get_settings(), sync=True)

    def run_until(self, end: datetime, step: timedelta = timedelta(hours=1)) -> None:
        from recovery import clock

        moment = clock.now()
        while moment < end:
            moment += step
            self.tick(moment)

    def drain(self, now: datetime | None = None) -> dict[int, str | None]:
        """Deliver the simulator's webhooks and process the stored events only."""
        from recovery.config import get_settings
        from recovery.engine import scheduler
        from recovery.inbox import relay

        self.sim.flush()
        now = now or datetime.now(UTC)
        published: list[int] = []
        relay.relay(published.extend, now, 500)
        return scheduler.process_events(published, now, get_settings())

    def failed(self, behavior: dict, **body) -> dict:
        """The simulator declines a renewal as `behavior` says."""
        from .factories import sim_post

        return sim_post(
            self.sim.url, "/_sim/scenarios/failed_invoice", {"behavior": behavior, **body}
        )

    def charges(self, invoice_id: str) -> list:
        with urllib.request.urlopen(f"{self.sim.url}/_sim/charges", timeout=10) as answer:
            return [c for c in json.loads(answer.read())["data"] if c[0] == invoice_id]


@pytest.fixture
def stack(sim, receiver) -> Iterator[Stack]:
    """The whole stack with the clock at T0."""
    from recovery import clock

    yield Stack(sim, receiver, T0)
    clock.set_now(None)


@pytest.fixture
def sqlite_stack(sim, sqlite) -> Iterator[Stack]:
    """The whole stack on SQLite, the embedded default, with the clock at T0."""
    from recovery import clock
    from recovery.config import get_settings
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    server = start_asgi_in_thread(make_app(get_settings()))
    yield Stack(sim, server.url, T0)
    server.stop()
    clock.set_now(None)


@pytest.fixture
def event_stack(sim, receiver) -> Stack:
    """The whole stack on the real clock, for the event path."""
    return Stack(sim, receiver, None)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def browser() -> Iterator:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "Debian's chromium and chromium-driver are not installed"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} and CI=true", pytrace=False)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="recovery-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No background traffic: this machine's network is closed.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
