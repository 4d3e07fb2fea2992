"""Every process logs through one configuration (JSON in production, scrubbed)
and its errors reach Sentry: real processes, a real prefork worker, and a
local HTTP server standing in for Sentry's ingest endpoint."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import structlog
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from recovery import __version__
from recovery.config import get_settings
from recovery.db import get_engine, session_scope
from recovery.models import WebhookEvent
from recovery.observability import configure_logging
from recovery.sim.servers import start_asgi_in_thread
from recovery.web import make_app

from .conftest import BASE_ENV, ROOT, free_port
from .factories import post_event, sim_post, stripe_event
from .test_worker_e2e import stop, wait_for

SECRET_NAME = "Jenny Rosen"
SECRET_EMAIL = "jenny.rosen@example.com"


class SentryIngest:
    """Takes Sentry envelopes over HTTP, as sentry.io's ingest does."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ingest.bodies.append(body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def events(self) -> list[dict]:
        found = []
        for body in list(self.bodies):
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found

    def raw(self) -> bytes:
        return b"".join(self.bodies)


@pytest.fixture
def sentry() -> Iterator[SentryIngest]:
    ingest = SentryIngest()
    yield ingest
    ingest.server.shutdown()
    ingest.server.server_close()


def json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a line that is not JSON: {line[:200]!r}") from None
    return parsed


def test_a_prefork_worker_logs_its_work_and_its_errors_reach_sentry(
    db,
    sim,
    receiver,
    flushed_redis,
    sentry,
    tmp_path,
):
    sim_post(
        sim.url,
        "/_sim/webhook_endpoints",
        {"url": f"{receiver}/webhooks/stripe", "secret": "whsec_test_current"},
    )
    env = {
        **os.environ,
        **BASE_ENV,
        "DATABASE_URL": db,
        "BROKER_URL": flushed_redis,
        "STRIPE_API_BASE": sim.url,
        "SENTRY_DSN": sentry.dsn,
        "LOG_FORMAT": "json",
        "EVENT_MAX_ATTEMPTS": "1",  # the first failure is the last: logged as an error
        "PYTHONPATH": str(ROOT),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "recovery", "worker", "--beat", "--concurrency", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        sim_post(
            sim.url,
            "/_sim/scenarios/failed_invoice",
            {"email": SECRET_EMAIL, "name": SECRET_NAME, "card": {"fingerprint": "fpLOGS"}},
        )
        # An invoice Stripe does not know: reading it fails, on the last try.
        post_event(receiver, stripe_event("invoice.payment_failed", {"id": "in_unknown"}))

        def all_ended() -> bool:
            with session_scope() as session:
                statuses = list(session.scalars(select(WebhookEvent.status)))
            return len(statuses) >= 2 and set(statuses) <= {"processed", "ignored", "failed"}

        try:
            wait_for(all_ended, 60)
        except AssertionError:
            with session_scope() as session:
                seen = list(session.execute(select(WebhookEvent.type, WebhookEvent.status)))
            raise AssertionError(f"events: {seen}; worker: {stop(worker)[-3000:]}") from None
        wait_for(lambda: any(e.get("message") == "event_failed" for e in sentry.events()), 30)
    finally:
        stderr = stop(worker)
    lines = json_lines(stderr)
    names = {line.get("event") for line in lines}
    assert {"event_processed", "event_failed"} <= names, names
    assert any(str(line.get("logger", "")).startswith("celery") for line in lines)
    failed = next(e for e in sentry.events() if e.get("message") == "event_failed")
    assert failed["release"] == f"recovery@{__version__}"
    assert failed["contexts"]["log"]["event_type"] == "invoice.payment_failed"
    for secret in (SECRET_EMAIL, SECRET_NAME, "fpLOGS", "whsec_test", "sk_test_recovery"):
        assert secret not in stderr, secret
        assert secret.encode() not in sentry.raw(), secret


def test_a_command_logs_through_the_same_configuration(db, tmp_path):
    env = {
        **os.environ,
        **BASE_ENV,
        "DATABASE_URL": db,
        "BROKER_URL": "memory://",
        "LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
    }
    with session_scope() as session:
        from recovery.inbox.receiver import inbox_row, parse_event

        event = stripe_event("plan.created", {"id": "plan_1", "object": "plan"})
        payload = json.dumps(event).encode()
        session.add(WebhookEvent(**inbox_row(parse_event(payload), payload, _now())))
    result = subprocess.run(
        [sys.executable, "-m", "recovery", "tick", "--sync"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "event_processed" in {line.get("event") for line in json_lines(result.stderr)}


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_the_served_app_logs_json_only_and_never_a_link_token(db, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        **BASE_ENV,
        "DATABASE_URL": db,
        "BROKER_URL": "memory://",
        "LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "recovery", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    token = "Tok3nThatMustNeverBeLogged_abcdef"
    try:

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(up, 30)
        for path in (f"/r/{token}?utm_source=email", f"/u/{token}", "/r/card-saved?x=secretq"):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).close()
            except urllib.error.HTTPError as answered:
                answered.close()
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    stderr = err.decode()
    lines = json_lines(stderr)
    loggers = {str(line.get("logger")) for line in lines}
    assert any(name.startswith("gunicorn") for name in loggers), loggers
    paths = [line["path"] for line in lines if line.get("event") == "request"]
    assert "/r/[redacted]" in paths and "/u/[redacted]" in paths and "/r/card-saved" in paths
    assert token not in stderr and "secretq" not in stderr and "utm_source" not in stderr


def test_a_database_error_logged_or_sent_names_no_row_values(db, sentry):
    from recovery.config import load_settings
    from recovery.observability import init_sentry

    stream = io.StringIO()
    settings = get_settings()
    configure_logging(settings, stream=stream)
    init_sentry(load_settings({**BASE_ENV, "SENTRY_DSN": sentry.dsn}))
    statement = text(
        "INSERT INTO customers (stripe_customer_id, email, created_at, updated_at)"
        " VALUES (:c, :e, now(), now())"
    )
    # Built at run time: a traceback quotes its source lines, not their values.
    customer, other_address = "cus_" + "fpSECRET", "x@" + "y.z"
    with get_engine().begin() as conn:
        conn.execute(statement, {"c": customer, "e": SECRET_EMAIL})
    with pytest.raises(IntegrityError) as duplicate, get_engine().begin() as conn:
        conn.execute(statement, {"c": customer, "e": other_address})
    assert other_address not in str(duplicate.value)  # the statement's parameters are hidden
    try:
        raise duplicate.value
    except IntegrityError:
        structlog.get_logger("recovery.test").exception("insert_failed")
    import sentry_sdk

    sentry_sdk.get_client().close(timeout=5)  # sends what it holds, then reports nowhere
    logged = stream.getvalue()
    assert "insert_failed" in logged and "UniqueViolation" in logged
    assert any(e.get("exception") for e in sentry.events())
    for place in (logged, sentry.raw().decode()):
        assert customer not in place and other_address not in place
        assert "DETAIL:[redacted]" in place


def test_the_in_process_app_writes_an_access_line_per_request(db):
    stream = io.StringIO()
    configure_logging(get_settings(), stream=stream)
    server = start_asgi_in_thread(make_app(get_settings()))
    try:
        for path in ("/healthz?token=abc", "/r/AAAAAAAAAAAAAAAAAAAAAAAA"):
            try:
                urllib.request.urlopen(f"{server.url}{path}", timeout=10).close()
            except urllib.error.HTTPError as answered:
                answered.close()
        time.sleep(0.1)
    finally:
        server.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    requests = [(line["path"], line["status"]) for line in lines if line["event"] == "request"]
    assert requests == [("/healthz", 200), ("/r/[redacted]", 404)]


def test_a_step_given_up_reaches_sentry(db, sentry):
    from recovery.config import load_settings
    from recovery.db import session_scope
    from recovery.engine import steps
    from recovery.observability import init_sentry

    from .factories import make_case, make_step

    configure_logging(get_settings(), stream=io.StringIO())
    init_sentry(load_settings({**BASE_ENV, "SENTRY_DSN": sentry.dsn}))
    now = datetime.now(UTC)
    lease = timedelta(minutes=5)
    with session_scope() as session:
        make_step(session, make_case(session), due_at=now, tries=steps.MAX_TRANSIENT_TRIES - 1)
    [claim] = steps.claim_due(now, 10, lease)
    step = steps.start(claim, now, lease)
    assert step is not None
    with session_scope() as session:
        outcome = steps.back_off(session, step, now, "APIConnectionError")
    assert outcome == "failed_unavailable"
    import sentry_sdk

    sentry_sdk.get_client().close(timeout=5)
    assert any("step_given_up" in json.dumps(e) for e in sentry.events())


def test_an_exception_in_the_app_served_in_process_reaches_our_log_and_sentry(sentry):
    from recovery.config import load_settings
    from recovery.observability import init_sentry
    from recovery.sim.servers import start_asgi_in_thread

    stream = io.StringIO()
    configure_logging(get_settings(), stream=stream)
    init_sentry(load_settings({**BASE_ENV, "SENTRY_DSN": sentry.dsn}))

    async def broken(scope, receive, send):
        if scope["type"] == "http":
            raise RuntimeError("the app broke")

    server = start_asgi_in_thread(broken)
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{server.url}/", timeout=10)
    finally:
        server.stop()
    import sentry_sdk

    sentry_sdk.get_client().close(timeout=5)
    assert "Exception in ASGI application" in stream.getvalue()
    assert any("the app broke" in json.dumps(e) for e in sentry.events())
