"""The whole loop on real services: a failed renewal → an email over SMTP →
the customer opens the link → Stripe's setup page → a signed completion
webhook → an immediate retry → paid → recovered → the thank-you email."""

from __future__ import annotations

import http.client
import json
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import select

from recovery import clock
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import scheduler
from recovery.models import AuditEntry, Message, RecoveryAttempt, RecoveryCase

from .factories import sim_post

T0 = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)


def pass_at(sim, instant: datetime):
    clock.set_now(instant)
    sim.flush()
    return scheduler.run_pass(get_settings(), sync=True)


def open_link(url: str, choice: str | None = None) -> http.client.HTTPResponse:
    """GET the link, or post a choice on its page."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    if choice is None:
        conn.request("GET", parts.path)
    else:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        conn.request("POST", parts.path, body=f"do={choice}", headers=form)
    answer = conn.getresponse()
    answer.body = answer.read()
    conn.close()
    return answer


def test_email_link_card_update_retry_recovered_thank_you(sim, smtp_sink, monkeypatch, db):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    web = start_asgi_in_thread(make_app(get_settings()))
    monkeypatch.setenv("PUBLIC_BASE_URL", web.url)
    get_settings.cache_clear()
    try:
        sim_post(
            sim.url,
            "/_sim/webhook_endpoints",
            {"url": f"{web.url}/webhooks/stripe", "secret": "whsec_test_current"},
        )
        pass_at(sim, T0)
        scenario = sim_post(
            sim.url,
            "/_sim/scenarios/failed_invoice",
            {
                "behavior": {"decline_code": "expired_card"},
                "email": "jenny.rosen@example.com",
                "name": "Jenny Rosen",
                "amount": 4900,
                "currency": "eur",
            },
        )
        pass_at(sim, T0 + timedelta(minutes=1))

        # The email: the card cannot be charged, here is a link.
        [(to, email)] = smtp_sink.messages
        assert to == ["jenny.rosen@example.com"]
        text = email.get_body(("plain",)).get_content()
        assert "the card on file has expired" in text and "€49.00" in text
        link = next(word for word in text.split() if "/r/" in word)

        # The customer clicks: a page offering to pay now or to save a card;
        # they choose the card, and a setup session is made now on Stripe's side.
        clock.set_now(T0 + timedelta(hours=2))
        page = open_link(link)
        assert page.status == 200 and b"Pay \xe2\x82\xac49.00 now" in page.body
        answer = open_link(link, "card")
        assert answer.status == 303
        checkout = answer.getheader("Location")
        assert checkout.startswith(f"{sim.url}/hosted/checkout/")

        # They enter a working card; Stripe sends the signed events.
        request = urllib.request.Request(
            checkout,
            data=json.dumps({"card": {"brand": "mastercard", "last4": "4444"}}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as completed:
            assert json.loads(completed.read())["status"] == "complete"
        result = pass_at(sim, T0 + timedelta(hours=2, minutes=1))

        with session_scope() as session:
            case = session.scalars(
                select(RecoveryCase).where(RecoveryCase.invoice_id == scenario["invoice"])
            ).one()
            retry = session.scalars(
                select(RecoveryAttempt).where(
                    RecoveryAttempt.case_id == case.id,
                    RecoveryAttempt.kind == "retry",
                    RecoveryAttempt.origin == "card_update",
                )
            ).one()
            actions = session.scalars(
                select(AuditEntry.action).where(AuditEntry.case_id == case.id)
            ).all()
        # Retried in the same pass that saw the card, and paid.
        assert retry.step.startswith("retry:card-update") and retry.outcome == "paid"
        assert case.status == "recovered" and case.amount_recovered == 4900
        assert (case.recovery_path, case.recovered_by_step) == ("card_update", "retry:card-update")
        assert (case.first_decline_code, case.first_category) == ("expired_card", "customer_action")
        assert "card_updated" in actions and result.outcomes.get("paid") == 1
        charged = sim.state.objects[sim.state.charges[-1][1]]
        assert charged["payment_method_details"]["card"]["last4"] == "4444"

        pass_at(sim, T0 + timedelta(hours=2, minutes=2))
        assert [e["Subject"] for _, e in smtp_sink.messages] == [
            "Our service: action needed, please update your card",
            "Our service: thank you, your payment went through",
        ]
        with session_scope() as session:
            sent = session.scalars(select(Message.template).where(Message.status == "sent"))
            assert sorted(sent) == ["card_update_needed", "recovered"]
        # The link is spent: the case is closed and paid.
        assert b"all set" in _body(link)
    finally:
        web.stop()
        clock.set_now(None)


def _body(url: str) -> bytes:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path)
    body = conn.getresponse().read()
    conn.close()
    return body
