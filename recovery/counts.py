"""What each figure counts, defined once. `recovery stats`, `recovery status`,
/metrics, the report, `recovery simulate` and the demo all read it here.

- A **retry** is a charge attempt that reached Stripe: a retry step (the
  plan's, a card update's, another saved card's, an operator's) whose pay
  request Stripe answered, paid or declined. A retry step that ended without
  a charge (no other card to try, the declined card again, the invoice found
  settled at Stripe, a network limit's stop code, a refusal) is a step that
  charged nothing, counted by what stopped it; a canceled one is canceled.
- An **email sent** is a message the SMTP server accepted; an **SMS sent**
  one the SMS provider accepted.
- A **channel** is where a customer's link was handed out: email, sms,
  notice (the embedded notice), app (the status API), webhook. A recovery
  counts for the channel of the link the customer clicked last.
- A case is **recovered** when its invoice was paid, however; the amount
  recovered is what Stripe says was paid, per currency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from recovery.models import (
    CaseStatus,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    RecoveryLink,
    StepKind,
    StepOutcome,
    TextMessage,
    TextStatus,
)

# Stripe's answers to a charge: only these outcomes mean a charge was made.
CHARGE_ANSWERS = (StepOutcome.PAID, StepOutcome.DECLINED)
# A step the engine withdrew before it ran (the plan changed, the case closed).
WITHDRAWN = (StepOutcome.CANCELED,)


@dataclass
class RetrySteps:
    """What the finished retry steps did: charges by Stripe's answer, steps
    that charged nothing by what stopped them, and steps withdrawn."""

    charges: dict[str, int] = field(default_factory=dict)
    charged_nothing: dict[str, int] = field(default_factory=dict)
    canceled: int = 0

    @property
    def made(self) -> int:
        """Retries made: charges that reached Stripe."""
        return sum(self.charges.values())


def _opened_since(query: Select, since: datetime | None) -> Select:
    """Only the cases opened at or after `since` (all when None)."""
    return query if since is None else query.where(RecoveryCase.opened_at >= since)


def _of_cases(since: datetime | None) -> ColumnElement[bool]:
    return RecoveryAttempt.case_id.in_(_opened_since(select(RecoveryCase.id), since))


def retry_steps(session: Session, since: datetime | None = None) -> RetrySteps:
    query = (
        select(RecoveryAttempt.outcome, func.count())
        .where(RecoveryAttempt.kind == StepKind.RETRY, RecoveryAttempt.outcome.is_not(None))
        .group_by(RecoveryAttempt.outcome)
    )
    if since is not None:
        query = query.where(_of_cases(since))
    found = RetrySteps()
    for outcome, count in session.execute(query):
        if outcome in CHARGE_ANSWERS:
            found.charges[str(outcome)] = count
        elif outcome in WITHDRAWN:
            found.canceled += count
        else:
            found.charged_nothing[str(outcome)] = count
    found.charges = {a.value: found.charges.get(a.value, 0) for a in CHARGE_ANSWERS}
    found.charged_nothing = dict(sorted(found.charged_nothing.items()))
    return found


def is_sent() -> ColumnElement[bool]:
    """The emails sent: accepted by the SMTP server."""
    return Message.status == MessageStatus.SENT


def is_text_sent() -> ColumnElement[bool]:
    """The SMS sent: accepted by the provider."""
    return TextMessage.status == TextStatus.SENT


CHANNELS = ("email", "sms", "notice", "app", "webhook")


def by_channel(session: Session, case_ids: list[int], won: set[int]) -> list[dict[str, Any]]:
    """Per channel: messages sent (emails, SMS; links handed out for the
    others), cases reached, cases that clicked its link, and recovered cases
    whose last click was its."""
    emails = (
        session.execute(select(Message.case_id).where(Message.case_id.in_(case_ids), is_sent()))
        .scalars()
        .all()
    )
    texts = (
        session.execute(
            select(TextMessage.case_id).where(TextMessage.case_id.in_(case_ids), is_text_sent())
        )
        .scalars()
        .all()
    )
    handed = session.execute(
        select(
            RecoveryLink.case_id,
            RecoveryLink.channel,
            RecoveryLink.click_count,
            RecoveryLink.last_clicked_at,
        ).where(RecoveryLink.case_id.in_(case_ids))
    ).all()
    last: dict[int, tuple[datetime, str]] = {}
    for case_id, channel, clicks, at in handed:
        if case_id is None or not clicks or at is None:
            continue
        if case_id not in last or at > last[case_id][0]:
            last[case_id] = (at, channel)
    rows = []
    for channel in CHANNELS:
        links = [row for row in handed if row.channel == channel]
        messages = {"email": list(emails), "sms": list(texts)}.get(
            channel, [row.case_id for row in links]
        )
        rows.append(
            {
                "name": channel,
                "sent": len(messages),
                "reached": len(set(messages)),
                "clicked": len({row.case_id for row in links if row.click_count}),
                "recovered_after_click": sum(
                    1 for case_id, (_, ch) in last.items() if ch == channel and case_id in won
                ),
            }
        )
    return rows


def cases_by_status(session: Session, since: datetime | None = None) -> dict[str, int]:
    """Every case in exactly one status, each status named even when empty."""
    query = select(RecoveryCase.status, func.count()).group_by(RecoveryCase.status)
    counted = dict(session.execute(_opened_since(query, since)).all())
    return {s.value: counted.get(s, 0) for s in CaseStatus}


def recovered_amounts(
    session: Session, since: datetime | None = None, recovered_since: datetime | None = None
) -> dict[str, int]:
    """The amount recovered, in minor units, per currency: of the cases opened
    since `since`, or recovered since `recovered_since`."""
    query = (
        select(RecoveryCase.currency, func.sum(RecoveryCase.amount_recovered))
        .where(RecoveryCase.status == CaseStatus.RECOVERED)
        .group_by(RecoveryCase.currency)
        .order_by(RecoveryCase.currency)
    )
    if recovered_since is not None:
        query = query.where(RecoveryCase.closed_at >= recovered_since)
    return {
        currency: int(amount or 0)
        for currency, amount in session.execute(_opened_since(query, since))
    }
