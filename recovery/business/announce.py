"""Events a business can act on, written where its case changes.

Each event is an `Announcement` row plus one `Delivery` row per enabled
endpoint that hears its type, all added to the caller's session: they commit
with the change they report or not at all, so nothing is announced that did
not happen and nothing that happened goes unannounced. The caller holds the
case's row lock (engine/cases.py), so a case's events are numbered 1, 2, 3…
in the order they happened; a receiver orders them by `sequence`.

No event carries a customer's name or email: the Stripe ids identify the
customer in the business's own systems.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery.models import (
    Announcement,
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointStatus,
    RecoveryCase,
)

OPENED = "case.opened"
CUSTOMER_ACTION_REQUIRED = "case.customer_action_required"
FINAL_ACTION_SCHEDULED = "case.final_action_scheduled"
RECOVERED = "case.recovered"
CLOSED = "case.closed"
PAUSED = "case.paused"
RESUMED = "case.resumed"
PING = "ping"

CASE_EVENTS = (
    OPENED,
    CUSTOMER_ACTION_REQUIRED,
    FINAL_ACTION_SCHEDULED,
    RECOVERED,
    CLOSED,
    PAUSED,
    RESUMED,
)


def new_public_id() -> str:
    return "msg_" + secrets.token_hex(12)


def case_facts(case: RecoveryCase) -> dict[str, Any]:
    """What every case event says of its case: ids, money, state."""
    return {
        "id": case.id,
        "invoice": case.invoice_id,
        "customer": case.stripe_customer_id,
        "subscription": case.subscription_id,
        "status": case.status.value,
        "amount_due": case.amount_due,
        "currency": case.currency,
        "category": case.category,
        "livemode": case.livemode,
        "opened_at": iso(case.opened_at),
    }


def case_event(
    session: Session, case: RecoveryCase, type_: str, now: datetime, **data: Any
) -> Announcement:
    """Announce `type_` about `case` (locked by the caller) to every endpoint
    that hears it."""
    if type_ not in CASE_EVENTS:
        raise ValueError(f"not a case event: {type_}")
    case.announced = (case.announced or 0) + 1
    return _announce(
        session,
        Announcement(
            public_id=new_public_id(),
            type=type_,
            case_id=case.id,
            sequence=case.announced,
            data={"case": case_facts(case), "sequence": case.announced, **data},
            created_at=now,
        ),
        now,
    )


def ping(session: Session, endpoint: Endpoint, now: datetime) -> Delivery:
    """A `ping` owed to one endpoint only (`recovery endpoints test`)."""
    announcement = Announcement(
        public_id=new_public_id(), type=PING, data={"endpoint": endpoint.id}, created_at=now
    )
    session.add(announcement)
    session.flush()
    delivery = _owed(endpoint, announcement, now)
    session.add(delivery)
    session.flush()
    return delivery


def hears(endpoint: Endpoint, type_: str) -> bool:
    return endpoint.events is None or type_ in endpoint.events


def _announce(session: Session, announcement: Announcement, now: datetime) -> Announcement:
    session.add(announcement)
    session.flush()
    endpoints = session.scalars(
        select(Endpoint).where(Endpoint.status == EndpointStatus.ENABLED)
    ).all()
    session.add_all(
        _owed(endpoint, announcement, now)
        for endpoint in endpoints
        if hears(endpoint, announcement.type)
    )
    return announcement


def _owed(endpoint: Endpoint, announcement: Announcement, now: datetime) -> Delivery:
    """The delivery of `announcement` that `endpoint` is owed, due now."""
    return Delivery(
        endpoint_id=endpoint.id,
        announcement_id=announcement.id,
        status=DeliveryStatus.PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")
