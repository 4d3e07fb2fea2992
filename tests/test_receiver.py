"""POST /webhooks/stripe over real HTTP against PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from recovery.db import session_scope
from recovery.inbox.receiver import sign
from recovery.models import WebhookEvent

from .conftest import OLD_WEBHOOK_SECRET
from .factories import invoice_object, post, post_event, signed_headers, stripe_event


def stored_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(WebhookEvent))


def webhook(receiver: str) -> str:
    return f"{receiver}/webhooks/stripe"


def test_good_signature_is_stored_pending(receiver):
    event = stripe_event("invoice.payment_failed", invoice_object())
    status, body = post_event(receiver, event)
    assert (status, body) == (200, {"received": True, "duplicate": False})
    with session_scope() as session:
        row = session.scalars(select(WebhookEvent)).one()
        assert (row.stripe_event_id, row.type, row.status) == (
            event["id"],
            "invoice.payment_failed",
            "pending",
        )
        assert json.loads(row.payload) == event
        assert row.stripe_created_at.timestamp() == event["created"]
        assert row.received_at.tzinfo is not None


def test_rotated_secret_still_accepted(receiver):
    status, _ = post_event(
        receiver, stripe_event("invoice.paid", invoice_object()), secret=OLD_WEBHOOK_SECRET
    )
    assert status == 200
    assert stored_count() == 1


def test_tampered_body_is_rejected_and_not_stored(receiver):
    body = json.dumps(stripe_event("invoice.paid", invoice_object())).encode()
    headers = signed_headers(body)
    status, answer = post(webhook(receiver), body.replace(b"2000", b"1"), headers)
    assert status == 400 and "signature" in answer["error"]
    assert stored_count() == 0


def test_stale_and_future_timestamps_are_rejected(receiver):
    body = json.dumps(stripe_event("invoice.paid", invoice_object())).encode()
    for skew in (-301, 301):
        status, answer = post(
            webhook(receiver), body, signed_headers(body, timestamp=int(time.time()) + skew)
        )
        assert status == 400 and "tolerance" in answer["error"]
    assert stored_count() == 0


def test_one_valid_among_several_v1_values(receiver):
    body = json.dumps(stripe_event("invoice.paid", invoice_object())).encode()
    now = int(time.time())
    header = f"t={now},v1={'0' * 64},v1={sign(body, 'whsec_test_current', now)}"
    headers = {"Content-Type": "application/json", "Stripe-Signature": header}
    status, _ = post(webhook(receiver), body, headers)
    assert status == 200
    assert stored_count() == 1


def test_signature_with_an_unknown_secret_is_rejected(receiver):
    status, _ = post_event(
        receiver, stripe_event("invoice.paid", invoice_object()), secret="whsec_someone_else"
    )
    assert status == 400
    assert stored_count() == 0


def test_missing_header_is_rejected(receiver):
    body = json.dumps(stripe_event("invoice.paid", invoice_object())).encode()
    status, answer = post(webhook(receiver), body, {"Content-Type": "application/json"})
    assert (status, answer) == (400, {"error": "missing Stripe-Signature header"})
    assert stored_count() == 0


def test_malformed_json_and_non_events_are_rejected(receiver):
    for body in (
        b'{"id": "evt_1", "object": "event"',
        b'{"object": "charge", "id": "ch_1"}',
        b"[]",
        b'{"object": "event", "id": "evt_1", "type": "x"}',
    ):
        status, answer = post(webhook(receiver), body, signed_headers(body))
        assert status == 400, body
        assert answer["error"].startswith(("body is not", "event field"))
    assert stored_count() == 0


def test_oversized_body_is_413(receiver):
    import http.client
    from urllib.parse import urlsplit

    body = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    parts = urlsplit(receiver)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/webhooks/stripe")
    for name, value in {**signed_headers(body), "Content-Length": str(len(body))}.items():
        conn.putheader(name, value)
    conn.endheaders()
    # The receiver may answer from the Content-Length and stop reading.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.send(body)
    answer = conn.getresponse()
    assert (answer.status, json.loads(answer.read())) == (413, {"error": "body larger than 1 MiB"})
    conn.close()
    assert stored_count() == 0


def test_unknown_type_is_stored_and_answered(receiver):
    event = stripe_event("plan.created", {"id": "price_1", "object": "plan"})
    assert post_event(receiver, event)[0] == 200
    assert stored_count() == 1


def test_same_event_fifty_times_concurrently_is_one_row(receiver):
    body = json.dumps(stripe_event("invoice.payment_failed", invoice_object())).encode()
    headers = signed_headers(body)
    with ThreadPoolExecutor(max_workers=25) as pool:
        answers = list(pool.map(lambda _: post(webhook(receiver), body, headers), range(50)))
    assert {status for status, _ in answers} == {200}
    assert sum(not answer["duplicate"] for _, answer in answers) == 1
    assert stored_count() == 1


def test_database_down_answers_503(db):
    from recovery.config import load_settings
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    from .conftest import BASE_ENV, free_port, reload_settings

    reload_settings(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    server = start_asgi_in_thread(make_app(load_settings(BASE_ENV)))
    url = server.url
    try:
        status, answer = post_event(url, stripe_event("invoice.paid", invoice_object()))
        assert status == 503 and "retry" in answer["error"]
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{url}/readyz", timeout=10)
        assert not_ready.value.code == 503
        not_ready.value.close()
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()
    reload_settings(DATABASE_URL=db)
    assert stored_count() == 0
