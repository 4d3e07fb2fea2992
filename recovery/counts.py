"""What each figure counts, defined once. `recovery stats`, `recovery status`,
/metrics, the report, `recovery simulate` and the demo all read it here.

- A **retry** is a charge attempt that reached Stripe: a retry step (the
  plan's, a card update's, another saved card's, an operator's) whose pay
  request Stripe answered, paid or declined. A retry step that ended without
  a charge (no other card to try, the declined card again, the invoice found
  settled at Stripe, a network limit's stop code, a refusal) is a step that
  charged nothing, counted by what stopped it; a canceled one is canceled.
- An **email sent** is a message the SMTP server accepted.
- A case is **recovered** when its invoice was paid, however; the amount
  recovered is what Stripe says was paid, per currency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from recovery.models import (
    CaseStatus,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepOutcome,
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
