"""Emails through a real SMTP server: content, one send per step under
concurrency, transient and permanent failures, opt-out, nothing personal in logs."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from sqlalchemy import func, select, update

from recovery import clock
from recovery.config import get_settings
from recovery.customers import delivery, links, mailer, outbox
from recovery.db import session_scope
from recovery.engine import scheduler
from recovery.models import Customer, Message, RecoveryAttempt, RecoveryCase

from .factories import sim_post

T0 = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)


@pytest.fixture
def world(sim, receiver, smtp_sink):
    sim_post(
        sim.url,
        "/_sim/webhook_endpoints",
        {"url": f"{receiver}/webhooks/stripe", "secret": "whsec_test_current"},
    )
    clock.set_now(T0)
    yield sim, smtp_sink
    clock.set_now(None)


def fail(sim, **behavior) -> str:
    scenario = sim_post(
        sim.url,
        "/_sim/scenarios/failed_invoice",
        {
            "behavior": {"decline_code": "insufficient_funds", **behavior},
            "email": "jenny.rosen@example.com",
            "name": "Jenny Rosen",
            "card": {"brand": "visa", "last4": "4242"},
        },
    )
    sim.flush()
    return scenario["invoice"]


def messages() -> list[Message]:
    with session_scope() as session:
        return list(session.scalars(select(Message).order_by(Message.id)))


def test_first_email_is_delivered_over_smtp_with_both_parts(world):
    sim, sink = world
    fail(sim)
    result = scheduler.run_pass(get_settings(), sync=True)
    assert result.outcomes.get("sent") == 1
    [(recipients, message)] = sink.messages
    assert recipients == ["jenny.rosen@example.com"]
    assert message["Subject"] == "Our service: your payment did not go through"
    assert message["From"] == "Billing <billing@example.com>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "$20.00" in text and "$20.00" in html and "Visa ending in 4242" in text
    assert "Hi Jenny," in text and "your bank declined the payment" in text
    link = next(w for w in text.split() if "/r/" in w)
    assert link.startswith(get_settings().public_base_url + "/r/") and f'href="{link}"' in html
    [row] = messages()
    assert (row.status, row.template, row.attempts) == ("sent", "payment_failed", 1)
    assert row.smtp_message_id == message["Message-ID"]


def test_concurrent_senders_send_a_step_once(world):
    sim, sink = world
    fail(sim)
    scheduler.run_pass(get_settings(), sync=True)
    sink.messages.clear()
    with session_scope() as session:
        [row] = session.scalars(select(Message)).all()
        key = row.key
        # Back to pending, as if queued and not yet sent; redelivered steps
        # then try to queue the same email again.
        session.execute(update(Message).values(status="pending", attempts=0))
        queued_again = [outbox.enqueue(session, key, row.template, row.step, T0) for _ in range(3)]
    assert queued_again == [False, False, False]
    barrier = threading.Barrier(6)
    outcomes = []

    errors = []

    def sender():
        try:
            send_twice()
        except Exception as exc:  # noqa: BLE001 - a thread's failure fails the test below
            errors.append(exc)

    def send_twice():
        barrier.wait()
        ids = outbox.claim(T0, 10)
        outcomes.extend(delivery.send_all(ids, T0, get_settings()).values())
        outcomes.extend(delivery.send_all([row.id], T0, get_settings()).values())  # a stale task

    threads = [threading.Thread(target=sender) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(sink.messages) == 1
    assert outcomes.count("sent") == 1 and set(outcomes) == {"sent", None}
    assert len(messages()) == 1


def test_transient_smtp_error_is_retried_later_permanent_is_recorded(world):
    sim, sink = world
    sink.refuse = ["451 4.3.0 Mailbox busy <jenny.rosen@example.com>, try later"]
    fail(sim)
    scheduler.run_pass(get_settings(), sync=True)
    [row] = messages()
    assert row.status == "pending" and row.next_attempt_at > T0 and not sink.messages
    assert "jenny.rosen" not in row.last_error and "451" in row.last_error
    later = row.next_attempt_at
    clock.set_now(later)
    scheduler.run_pass(get_settings(), sync=True)
    assert [m.status for m in messages()] == ["sent"] and len(sink.messages) == 1

    sink.refuse = ["550 5.1.1 <jenny.rosen@example.com>: no such user"]
    second = fail(sim)
    scheduler.run_pass(get_settings(), sync=True)
    row = next(m for m in messages() if m.status != "sent")
    assert row.status == "failed" and row.last_error.startswith("550")
    assert "jenny.rosen" not in row.last_error
    with session_scope() as session:
        assert (
            session.scalars(
                select(RecoveryCase.status).where(RecoveryCase.invoice_id == second)
            ).one()
            == "open"
        )


def test_an_address_that_could_forge_headers_is_never_sent_to(world):
    sim, sink = world
    fail(sim)
    scheduler.run_pass(get_settings(), sync=True)
    # The address changes before the email is sent (again): a line break in it
    # would start a new header.
    with session_scope() as session:
        session.execute(update(Customer).values(email="jenny@example.com\r\nBcc: x@evil.test"))
        session.execute(update(Message).values(status="pending", attempts=0))
    scheduler.run_pass(get_settings(), sync=True)
    [row] = messages()
    assert (row.status, row.last_error) == ("skipped", "invalid email address")
    assert all("evil" not in ",".join(to) for to, _ in sink.messages)


def test_opted_out_customer_gets_no_more_reminders(world):
    sim, sink = world
    fail(sim)
    scheduler.run_pass(get_settings(), sync=True)
    assert len(sink.messages) == 1
    with session_scope() as session:
        session.execute(update(Customer).values(reminders_opted_out_at=T0))
    for hours in range(12, 24 * 9, 12):
        clock.set_now(T0 + timedelta(hours=hours))
        scheduler.run_pass(get_settings(), sync=True)
    assert len(sink.messages) == 1
    later = [m for m in messages() if m.status != "sent"]
    assert later and {(m.status, m.last_error) for m in later} == {
        ("skipped", "customer opted out of reminders")
    }


@pytest.mark.parametrize(
    ("left_as", "in_doubt", "then", "delivered"),
    [
        # Handed to SMTP when its worker died: it may have arrived; sent once
        # more with the same Message-ID, so mail systems drop a copy.
        ("sending", False, "sent", 1),
        # The same a second time: it may have arrived twice; never again.
        ("sending", True, "failed", 0),
        # Claimed but not yet handed to SMTP: nothing left us; it is sent.
        ("claimed", False, "sent", 1),
    ],
)
def test_a_worker_lost_mid_email(world, left_as, in_doubt, then, delivered):
    sim, sink = world
    fail(sim)
    scheduler.run_pass(get_settings(), sync=True)
    [(_rcpt, first)] = sink.messages
    sink.messages.clear()
    with session_scope() as session:
        session.execute(update(Message).values(status=left_as, lease_until=T0, in_doubt=in_doubt))
    clock.set_now(T0 + timedelta(minutes=6))
    assert scheduler.anything_due(clock.now())
    scheduler.run_pass(get_settings(), sync=True)
    assert not scheduler.anything_due(clock.now())
    [row] = messages()
    assert row.status == then and len(sink.messages) == delivered
    if left_as == "sending" and delivered:
        assert sink.messages[0][1]["Message-ID"] == first["Message-ID"]
    if then == "failed":
        assert "not sent again" in row.last_error


def test_a_pass_is_due_exactly_when_it_has_something_to_take(world):
    sim, _sink = world
    assert not scheduler.anything_due(T0)
    fail(sim)
    assert scheduler.anything_due(T0)  # the stored event
    scheduler.run_pass(get_settings(), sync=True)
    assert not scheduler.anything_due(T0)
    with session_scope() as session:
        next_step = session.scalar(
            select(func.min(RecoveryAttempt.due_at)).where(RecoveryAttempt.status == "scheduled")
        )
    assert not scheduler.anything_due(next_step - timedelta(seconds=1))
    assert scheduler.anything_due(next_step)
    # An email waiting for its next try counts from that try's time.
    retry_at = T0 + timedelta(minutes=30)
    with session_scope() as session:
        session.execute(update(Message).values(status="pending", next_attempt_at=retry_at))
    assert not scheduler.anything_due(retry_at - timedelta(seconds=1))
    assert scheduler.anything_due(retry_at)


def test_logs_hold_no_address_and_no_token(world):
    sim, sink = world
    with structlog.testing.capture_logs() as captured:
        fail(sim)
        scheduler.run_pass(get_settings(), sync=True)
    [(_, message)] = sink.messages
    text = message.get_body(("plain",)).get_content()
    tokens = [w.rsplit("/", 1)[-1] for w in text.split() if "/r/" in w or "/u/" in w]
    assert tokens and captured
    dumped = repr(captured)
    assert "jenny.rosen@example.com" not in dumped and "Jenny Rosen" not in dumped
    assert not any(token in dumped for token in tokens)


def test_file_sink_writes_one_eml_per_email(tmp_path):
    from email import message_from_bytes, policy

    from recovery.config import load_settings
    from recovery.customers import emails

    settings = load_settings({"OUTBOX_DIR": str(tmp_path)})
    transport = mailer.transport_for(settings)
    rendered = emails.render("recovered", emails.sample_facts("recovered"), settings)
    transport.send(mailer.build(rendered, "jenny.rosen@example.com", settings))
    [path] = tmp_path.glob("*.eml")
    parsed = message_from_bytes(path.read_bytes(), policy=policy.default)
    assert parsed["To"] == "jenny.rosen@example.com" and parsed.is_multipart()


def test_pre_dunning_once_per_card_and_expiry(world):
    sim, sink = world
    customer = sim_post(
        sim.url,
        "/_sim/customers",
        {
            "email": "jenny.rosen@example.com",
            "name": "Jenny Rosen",
            "card": {"brand": "visa", "last4": "4242", "exp_month": 11, "exp_year": 2026},
        },
    )
    for _ in range(2):  # Stripe may send the notice again
        sim_post(sim.url, f"/_sim/customers/{customer['id']}/card_expiring", {})
    sim.flush()
    scheduler.run_pass(get_settings(), sync=True)
    scheduler.run_pass(get_settings(), sync=True)
    [(to, message)] = sink.messages
    assert to == ["jenny.rosen@example.com"]
    text = message.get_body(("plain",)).get_content()
    assert "Visa ending in 4242" in text and "November 2026" in text
    link = next(word for word in text.split() if "/r/" in word)
    token = link.rsplit("/", 1)[-1]

    answer = links.redeem(token, T0, get_settings())
    assert answer.status == 303 and "/hosted/checkout/" in answer.location
    [row] = messages()
    assert (row.template, row.case_id, row.status) == ("card_expiring", None, "sent")
