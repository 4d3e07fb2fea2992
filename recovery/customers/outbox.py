"""The email outbox: every email is a row, sent at most once.

    enqueue ─▶ pending ─claim─▶ claimed ─(checks, link, render)─▶ sending ─SMTP─▶ sent
                  ▲                 │ lease ran out: nothing left us,   │ lease ran out: the
                  │                 ▼ pending again                     ▼ server may have it,
                  └── transient error, with backoff          failed (never resent)

A row is unique per key (a case's plan step, a card's expiry), so concurrent
dispatch, a redelivered task or a second beat cannot create a second email.
Sending is delivery.py: just before handing an email to SMTP its row is
marked `sending` and committed, so a worker that dies after that point leaves
an email that may have gone out, recorded for an operator instead of being
sent again. This module only keeps the rows; it asks nothing of the cases, so
engine/cases.py can queue the thank-you when a case is recovered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from recovery.db import dialect_of, insert_ignore, rows_changed, session_scope
from recovery.models import Message, MessageStatus, RecoveryCase

log = structlog.get_logger("recovery.outbox")

LEASE = timedelta(minutes=5)
_IN_DOUBT = "in doubt: worker lost while sending; sent once more with the same Message-ID"
_LOST = "in doubt twice; not sent again so it cannot arrive more than twice"


def case_key(case_id: int, step: str) -> str:
    return f"case:{case_id}:{step}"


@dataclass(frozen=True)
class CardFacts:
    """The card a pre-dunning email is about."""

    brand: str
    last4: str | None
    exp_month: int
    exp_year: int


def enqueue(
    session: Session,
    key: str,
    template: str,
    step: str,
    now: datetime,
    case_id: int | None = None,
    customer_id: int | None = None,
    card: CardFacts | None = None,
) -> bool:
    """Queue an email unless one with this key exists; True if queued now."""
    return insert_ignore(
        session,
        Message,
        {
            "key": key,
            "case_id": case_id,
            "customer_id": customer_id,
            "step": step,
            "template": template,
            "card_brand": card.brand if card else None,
            "card_last4": card.last4 if card else None,
            "card_exp_month": card.exp_month if card else None,
            "card_exp_year": card.exp_year if card else None,
            "status": MessageStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        },
        ["key"],
    )


def on_case_recovered(session: Session, case: RecoveryCase, now: datetime) -> None:
    """Thank a customer we reminded; one who never heard from us gets nothing."""
    reminded = session.scalar(
        select(func.count())
        .select_from(Message)
        .where(Message.case_id == case.id, Message.status == MessageStatus.SENT)
    )
    if reminded:
        enqueue(session, case_key(case.id, "recovered"), "recovered", "recovered", now, case.id)


# -- claiming --------------------------------------------------------------------


def _lapsed(now: datetime, status: MessageStatus) -> ColumnElement[bool]:
    return (Message.status == status) & (Message.lease_until <= now)


def _claimable(now: datetime) -> ColumnElement[bool]:
    return (Message.status == MessageStatus.PENDING) & (Message.next_attempt_at <= now)


def due(now: datetime) -> ColumnElement[bool]:
    """The emails release_lapsed or claim take at `now`."""
    return or_(
        _lapsed(now, MessageStatus.CLAIMED), _lapsed(now, MessageStatus.SENDING), _claimable(now)
    )


def release_lapsed(now: datetime) -> int:
    """Leases that ran out: back to pending before SMTP; after, once more with
    the same Message-ID, then failed."""
    with session_scope() as session:
        back = rows_changed(
            session.execute(
                update(Message)
                .where(_lapsed(now, MessageStatus.CLAIMED))
                .values(status=MessageStatus.PENDING, lease_until=None)
            )
        )
        lapsed_sending = _lapsed(now, MessageStatus.SENDING)
        again = rows_changed(
            session.execute(
                update(Message)
                .where(lapsed_sending, Message.in_doubt.is_(False))
                .values(
                    status=MessageStatus.PENDING,
                    lease_until=None,
                    in_doubt=True,
                    next_attempt_at=now,
                    last_error=_IN_DOUBT,
                )
            )
        )
        lost = rows_changed(
            session.execute(
                update(Message)
                .where(lapsed_sending, Message.in_doubt.is_(True))
                .values(status=MessageStatus.FAILED, lease_until=None, last_error=_LOST)
            )
        )
    if again:
        log.warning("emails_in_doubt_sent_again", count=again)
    if lost:
        log.error("emails_lost_mid_send", count=lost)
    return back + again + lost


def claim(now: datetime, limit: int, keys: list[str] | None = None) -> list[int]:
    with session_scope() as session:
        due = (
            select(Message.id).where(_claimable(now)).order_by(Message.next_attempt_at).limit(limit)
        )
        if keys is not None:
            due = due.where(Message.key.in_(keys))
        if dialect_of(session) == "postgresql":
            due = due.with_for_update(skip_locked=True)
        return list(
            session.scalars(
                update(Message)
                .where(
                    Message.id.in_(due.scalar_subquery()), Message.status == MessageStatus.PENDING
                )
                .values(
                    status=MessageStatus.CLAIMED,
                    lease_until=now + LEASE,
                    attempts=Message.attempts + 1,
                )
                .returning(Message.id)
            )
        )


def dispatch(now: datetime, hand_off: Callable[[list[int]], None], batch: int = 200) -> int:
    """Claim every due email and hand each batch to `hand_off` (workers, or here)."""
    total = 0
    while ids := claim(now, batch):
        hand_off(ids)
        total += len(ids)
        if len(ids) < batch:
            break
    return total
