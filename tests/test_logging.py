"""No secrets, tokens, emails or card data in the logs of the event path."""

from __future__ import annotations

import io
import json
import re

from recovery.config import get_settings
from recovery.observability import REDACTED, configure_logging, scrub, sentry_before_send

from .conftest import OLD_WEBHOOK_SECRET, WEBHOOK_SECRET
from .factories import post, sim_post


def test_event_path_logs_hold_no_personal_or_secret_data(event_stack):
    stream = io.StringIO()
    configure_logging(get_settings(), stream=stream)
    scenario = sim_post(
        event_stack.sim.url,
        "/_sim/scenarios/failed_invoice",
        {
            "email": "jenny.rosen@example.com",
            "name": "Jenny Rosen",
            "card": {"fingerprint": "fpSECRETCARD", "last4": "7319"},
        },
    )
    event_stack.drain()
    post(f"{event_stack.receiver}/webhooks/stripe", b"{}", {"Stripe-Signature": "t=1,v1=abc"})
    sim_post(
        event_stack.sim.url, "/_sim/faults", {"path_prefix": "/v1/", "status": 500, "count": 5}
    )
    sim_post(event_stack.sim.url, f"/_sim/customers/{scenario['customer']}/cards", {})
    sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {"email": "other@example.org"})
    event_stack.drain()
    logs = stream.getvalue()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    events = {line["event"] for line in lines}
    assert {"case_opened", "failure_recorded", "webhook_rejected", "event_failed"} <= events
    for needle in (
        "jenny.rosen@example.com",
        "other@example.org",
        "Jenny Rosen",
        "fpSECRETCARD",
        WEBHOOK_SECRET,
        OLD_WEBHOOK_SECRET,
        "sk_test_recovery_tests",
    ):
        assert needle not in logs, needle
    # The last four digits, as a number of their own (random ids may hold them).
    assert not re.search(r"(?<![0-9a-f])7319(?![0-9a-f])", logs)


def test_scrubber_redacts_keys_and_values():
    scrubbed = scrub(
        {
            "email": "a@b.co",
            "note": "contact a@b.co with sk_live_abc123",
            "card_number": "4242424242424242",
            "nested": {"stripe_signature": "x"},
            "message": "card 4242 4242 4242 4242 declined",
        }
    )
    assert scrubbed["email"] == REDACTED and scrubbed["card_number"] == REDACTED
    assert scrubbed["note"] == f"contact {REDACTED} with {REDACTED}"
    assert scrubbed["nested"]["stripe_signature"] == REDACTED
    assert "4242" not in scrubbed["message"]


def test_sentry_events_lose_bodies_and_secret_headers():
    event = {
        "request": {
            "data": '{"email": "a@b.co"}',
            "cookies": {"s": "1"},
            "headers": {"Stripe-Signature": "t=1,v1=ff", "User-Agent": "Stripe"},
        },
        "extra": {"customer_email": "a@b.co", "api_key": "sk_test_x"},
        "exception": {"values": [{"value": "failed for a@b.co"}]},
    }
    cleaned = sentry_before_send(event, {})
    assert "data" not in cleaned["request"] and "cookies" not in cleaned["request"]
    assert cleaned["request"]["headers"] == {"User-Agent": "Stripe"}
    assert cleaned["extra"] == {"customer_email": REDACTED, "api_key": REDACTED}
    assert "a@b.co" not in json.dumps(cleaned)


def test_a_database_error_quoting_a_rows_values_logs_and_stores_none_of_them(db):
    import structlog
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from recovery.db import get_engine
    from recovery.inbox import relay

    errors = []
    for statement, value in (
        ("SELECT CAST(:v AS integer)", "card 4242 of jenny.rosen@example.com"),
        ("SELECT CAST(:v AS integer)", "4242424242"),
    ):
        try:
            with get_engine().connect() as conn:
                conn.execute(text(statement), {"v": value})
        except DBAPIError as exc:
            errors.append(exc)
    # PostgreSQL does quote them back (psycopg2 filled them in on the client).
    assert "4242" in str(errors[0]) and '"4242424242" is out of range' in str(errors[1])
    stream = io.StringIO()
    configure_logging(get_settings(), stream=stream)
    log = structlog.get_logger("recovery.test")
    for error in errors:
        log.error("statement_failed", error=str(error))
        try:
            raise error
        except DBAPIError:
            log.exception("statement_failed_with_traceback")
        stored = relay._describe(error)
        assert "4242" not in stored and "jenny" not in stored, stored
    logged = stream.getvalue()
    assert "statement_failed" in logged
    assert "4242" not in logged and "jenny" not in logged, logged[-2000:]
