"""Operator alerts through apprise, to a local HTTP sink by its `json://` URL:
each condition alerts when it starts, at most once an hour, and says when it
clears."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from recovery import stripe_api
from recovery.business import alerts
from recovery.cli import cli
from recovery.config import get_settings
from recovery.customers import delivery, outbox
from recovery.db import session_scope
from recovery.models import EventStatus, StepKind, StepOutcome, StepStatus, WebhookEvent

from .conftest import T0
from .factories import make_case, make_customer, make_message, make_step, stripe_event


class Sink:
    def __init__(self) -> None:
        self.received: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.received.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/alerts"

    def titles(self) -> list[str]:
        return [r["title"] for r in self.received]


@pytest.fixture
def sink(monkeypatch):
    alert_sink = Sink()
    monkeypatch.setenv("ALERT_URLS", alert_sink.url)
    get_settings.cache_clear()
    yield alert_sink
    alert_sink.server.shutdown()
    alert_sink.server.server_close()
    monkeypatch.delenv("ALERT_URLS")
    get_settings.cache_clear()


def failed_event(session) -> WebhookEvent:
    event = stripe_event("invoice.payment_failed", {"id": "in_alert"})
    row = WebhookEvent(
        stripe_event_id=event["id"],
        type=event["type"],
        livemode=False,
        stripe_created_at=T0,
        received_at=T0,
        payload=json.dumps(event),
        status=EventStatus.FAILED,
        attempts=3,
        available_at=T0,
    )
    session.add(row)
    session.flush()
    return row


def test_a_condition_alerts_once_an_hour_and_says_when_it_clears(db, sink):
    settings = get_settings()
    with session_scope() as session:
        event_id = failed_event(session).id
    told = alerts.check(T0, settings)
    assert [t.name for t in told] == [alerts.EVENT_FAILED]
    assert sink.titles() == ["⚠ recovery: event_failed"]
    assert "1 Stripe event(s) ended failed" in sink.received[0]["message"]
    # Still failing ten minutes later: nothing new; an hour later, a reminder.
    assert alerts.check(T0 + timedelta(minutes=10), settings) == []
    assert [t.what for t in alerts.check(T0 + timedelta(minutes=61), settings)] == ["reminder"]
    # Replayed and processed: cleared, once.
    with session_scope() as session:
        session.get(WebhookEvent, event_id).status = EventStatus.PROCESSED
    cleared = alerts.check(T0 + timedelta(minutes=70), settings)
    assert [(t.name, t.what) for t in cleared] == [(alerts.EVENT_FAILED, "cleared")]
    assert "cleared after 1 h 10 min" in sink.received[-1]["message"]
    assert len(sink.received) == 3
    # Failing again within the hour of the last alert (a flap): quiet.
    with session_scope() as session:
        session.get(WebhookEvent, event_id).status = EventStatus.FAILED
    assert alerts.check(T0 + timedelta(minutes=75), settings) == []
    assert len(sink.received) == 3


def test_due_steps_overdue_and_a_decline_rate_far_above_the_week_alert(db, sink):
    settings = get_settings()
    now = T0 + timedelta(days=8)
    with session_scope() as session:
        case = make_case(session)
        make_step(session, case, due_at=now - timedelta(minutes=settings.alert_overdue_minutes + 1))
        for n in range(40):  # last week: 10 of 40 declined
            make_step(
                session,
                case,
                status=StepStatus.DONE,
                outcome=StepOutcome.DECLINED if n < 10 else StepOutcome.PAID,
                executed_at=now - timedelta(days=3),
            )
        for n in range(25):  # today: 20 of 25
            make_step(
                session,
                case,
                status=StepStatus.DONE,
                outcome=StepOutcome.DECLINED if n < 20 else StepOutcome.PAID,
                executed_at=now - timedelta(hours=2),
            )
        # A step that charged nothing is no retry (counts.py) and no decline.
        make_step(
            session,
            case,
            kind=StepKind.RETRY,
            status=StepStatus.DONE,
            outcome=StepOutcome.NO_BACKUP_CARD,
            executed_at=now - timedelta(hours=1),
        )
    told = {t.name: t.text for t in alerts.check(now, settings)}
    assert set(told) == {alerts.STEPS_OVERDUE, alerts.DECLINE_RATE}
    assert told[alerts.DECLINE_RATE].startswith("80% of today's 25 retries declined, against 25%")


def test_a_mail_server_refusing_for_ten_minutes_alerts(db, sink, smtp_sink):
    settings = get_settings()

    with session_scope() as session:
        customer = make_customer(session, email="jenny.rosen@example.com")
        make_message(session, make_case(session, customer=customer), at=T0)
    smtp_sink.refuse += ["451 4.3.0 try again later"] * 2
    for at in (T0, T0 + timedelta(minutes=5)):
        assert set(delivery.send_all(outbox.claim(at, 50), at, settings).values()) == {"retrying"}
    assert alerts.check(T0 + timedelta(minutes=9), settings) == []
    told = alerts.check(T0 + timedelta(minutes=10), settings)
    assert [t.name for t in told] == [alerts.SMTP_REFUSING]
    assert "jenny" not in sink.received[-1]["message"]
    # It takes mail again: cleared.
    at = T0 + timedelta(minutes=12)
    delivery.send_all(outbox.claim(at + timedelta(hours=1), 50), at, settings)
    cleared = alerts.check(at, settings)
    assert [(t.name, t.what) for t in cleared] == [(alerts.SMTP_REFUSING, "cleared")]


def test_a_revoked_stripe_key_alerts_and_clears_when_it_works_again(db, sim, sink):
    settings = get_settings()
    sim.state.revoked_keys.add(settings.stripe_api_key)
    with pytest.raises(stripe_api.StripeRequestRejected):
        stripe_api.list_invoices(limit=1)
    assert sink.titles() == ["⚠ recovery: stripe_key"]
    assert "401" in sink.received[0]["message"]
    assert settings.stripe_api_key not in json.dumps(sink.received)
    # Still refused: the check's own probe keeps it firing, and quiet.
    assert alerts.check(T0, settings, stripe_api.key_works) == []
    sim.state.revoked_keys.clear()
    cleared = alerts.check(T0 + timedelta(minutes=1), settings, stripe_api.key_works)
    assert [(t.name, t.what) for t in cleared] == [(alerts.STRIPE_KEY, "cleared")]


def test_the_daily_digest_and_alerts_test(db, sink):
    with session_scope() as session:
        case = make_case(session, amount_due=2500, currency="eur")
        case.status, case.amount_recovered, case.closed_at = "recovered", 2500, T0
        make_case(session)
        failed_event(session)
    body = alerts.digest(T0 + timedelta(hours=2), get_settings())
    assert "Recovered in the last 24 hours: €25.00" in body
    assert "Open cases: 1." in body and "1 failed Stripe event(s)" in body
    assert sink.received[-1]["title"] == "recovery: daily digest"
    result = CliRunner().invoke(cli, ["alerts", "test"])
    assert result.exit_code == 0, result.output
    assert sink.titles()[-1] == "recovery: test alert"


def test_alerts_test_without_urls_says_so(db):
    result = CliRunner().invoke(cli, ["alerts", "test"])
    assert result.exit_code == 1 and "ALERT_URLS is empty" in result.output


def test_an_endpoint_disabled_alerts_until_it_is_enabled(db, sink, monkeypatch):
    from recovery import clock
    from recovery.business import announce, deliveries

    from .business_app import BusinessApp, start

    monkeypatch.setenv("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
    get_settings.cache_clear()
    app = BusinessApp(statuses=[410])
    server = start(app)
    try:
        added = CliRunner().invoke(cli, ["endpoints", "add", app.url])
        app.secrets.append(added.output.split()[-1])
        with session_scope() as session:
            announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
        deliveries.dispatch(clock.now(), lambda b: deliveries.send(b, get_settings()))
        assert sink.titles() == ["⚠ recovery: endpoint_disabled:1"]
        assert "410 Gone" in sink.received[0]["message"] and "whsec_" not in str(sink.received)
        assert CliRunner().invoke(cli, ["endpoints", "enable", "1"]).exit_code == 0
        assert sink.titles()[-1] == "✓ recovery: endpoint_disabled:1"
    finally:
        server.shutdown()
        server.server_close()
