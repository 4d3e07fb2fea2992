"""Test data: Stripe's objects and events built from Stripe's own examples
(recovery/sim/fixtures.json), and rows of our tables for tests that take a
session (cases, steps, messages), each unique so tests never collide."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery.db import session_scope
from recovery.inbox.receiver import signature_header
from recovery.models import (
    CaseStatus,
    Customer,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepOrigin,
    StepStatus,
)
from recovery.sim import objects

from .conftest import T0, WEBHOOK_SECRET


def stripe_event(
    event_type: str,
    obj: dict,
    *,
    created: int | None = None,
    livemode: bool = False,
    previous: dict | None = None,
) -> dict:
    return objects.event(
        created or int(time.time()), event_type, obj, livemode, "2026-10-28.endive", previous
    )


def invoice_object(**fields) -> dict:
    invoice = objects.example("invoice")
    invoice.update(
        id=objects.new_id("in"),
        status="open",
        amount_due=2000,
        amount_remaining=2000,
        currency="usd",
        customer="cus_test",
        customer_email="jenny.rosen@example.com",
    )
    invoice.update(fields)
    return invoice


def signed_headers(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None):
    header = signature_header(body, secret, int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "Stripe-Signature": header}


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_event(receiver_url: str, event: dict, secret: str = WEBHOOK_SECRET):
    body = json.dumps(event).encode()
    return post(f"{receiver_url}/webhooks/stripe", body, signed_headers(body, secret))


def sim_post(sim_url: str, path: str, body: dict | None = None) -> dict:
    status, answer = post(
        f"{sim_url}{path}", json.dumps(body or {}).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, answer
    return answer


# -- rows --------------------------------------------------------------------------------


def make_customer(session: Session, **fields: Any) -> Customer:
    customer = Customer(
        stripe_customer_id=objects.new_id("cus"),
        email="jenny.rosen@example.com",
        name="Jenny Rosen",
        created_at=T0,
        updated_at=T0,
    )
    for key, value in fields.items():
        setattr(customer, key, value)
    session.add(customer)
    session.flush()
    return customer


def make_case(
    session: Session,
    *,
    customer: Customer | None = None,
    at: datetime = T0,
    **fields: Any,
) -> RecoveryCase:
    """An open case of a soft decline (insufficient funds), failed at `at`."""
    customer = customer or make_customer(session)
    case = RecoveryCase(
        invoice_id=objects.new_id("in"),
        customer_id=customer.id,
        stripe_customer_id=customer.stripe_customer_id,
        subscription_id=objects.new_id("sub"),
        status=CaseStatus.OPEN,
        livemode=False,
        amount_due=2000,
        currency="usd",
        attempt_count=1,
        needs_authentication=False,
        decline_code="insufficient_funds",
        failure_code="card_declined",
        card_brand="visa",
        card_fingerprint=objects.new_id("fp"),
        card_last4="4242",
        category="funds",
        mode="take_over",
        first_failed_at=at,
        last_failure_at=at,
        opened_at=at,
        updated_at=at,
    )
    for key, value in fields.items():
        setattr(case, key, value)
    session.add(case)
    session.flush()
    return case


def make_step(
    session: Session,
    case: RecoveryCase,
    kind: StepKind = StepKind.RETRY,
    name: str | None = None,
    due_at: datetime = T0,
    status: StepStatus = StepStatus.SCHEDULED,
    **fields: Any,
) -> RecoveryAttempt:
    name = name or f"{kind.value}:{objects.new_id('step')}"
    step = RecoveryAttempt(
        case_id=case.id,
        kind=kind,
        step=name,
        origin=StepOrigin.PLAN,
        forced=False,
        status=status,
        due_at=due_at,
        claims=1 if status in (StepStatus.CLAIMED, StepStatus.EXECUTING) else 0,
        lease_until=due_at + timedelta(minutes=5)
        if status in (StepStatus.CLAIMED, StepStatus.EXECUTING)
        else None,
        tries=0,
        idempotency_key=f"recovery-{case.id}-{name}",
        created_at=due_at,
    )
    for key, value in fields.items():
        setattr(step, key, value)
    session.add(step)
    session.flush()
    return step


def make_message(
    session: Session,
    case: RecoveryCase | None = None,
    template: str = "payment_failed",
    status: MessageStatus = MessageStatus.PENDING,
    at: datetime = T0,
    **fields: Any,
) -> Message:
    key = f"test:{objects.new_id('msg')}"
    message = Message(
        key=key,
        case_id=case.id if case else None,
        customer_id=None if case else fields.pop("customer_id"),
        step=key,
        template=template,
        status=status,
        attempts=0,
        next_attempt_at=at,
        created_at=at,
    )
    for key, value in fields.items():
        setattr(message, key, value)
    session.add(message)
    session.flush()
    return message


# -- reading rows back (each in its own transaction) -------------------------------------


def case_of(invoice_id: str) -> RecoveryCase | None:
    """The invoice's case as committed, or None."""
    with session_scope() as session:
        return session.scalars(
            select(RecoveryCase).where(RecoveryCase.invoice_id == invoice_id)
        ).one_or_none()


def the_case(invoice_id: str) -> RecoveryCase:
    case = case_of(invoice_id)
    assert case is not None, f"no case for {invoice_id}"
    return case


def steps_of(case_id: int) -> list[RecoveryAttempt]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(RecoveryAttempt)
                .where(RecoveryAttempt.case_id == case_id)
                .order_by(RecoveryAttempt.id)
            )
        )
