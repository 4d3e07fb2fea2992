"""A customer's standing, as the business's app and the embedded notice read
it: is a payment of theirs being recovered, how much is due, what only they
can do, and when service ends if nothing is done.

One answer for both, read from the case the engine keeps: the customer's
open case whose plan ends first (the most urgent), what it asks of the
customer (`customer_action`, the same fact a `case.customer_action_required`
webhook reports), and the date its final action is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from recovery.config import Settings
from recovery.customers import links
from recovery.models import CaseStatus, Customer, LinkPurpose, RecoveryCase

PAY = "pay"
UPDATE_CARD = "update_card"
AUTHENTICATE = "authenticate"

# The link that lets the customer do what is asked.
PURPOSE = {
    PAY: LinkPurpose.PAY,
    UPDATE_CARD: LinkPurpose.UPDATE_CARD,
    AUTHENTICATE: LinkPurpose.AUTHENTICATE,
}


def link_purpose(action: str | None) -> LinkPurpose:
    """The link for a case's `customer_action` (None: nothing only the
    customer can do, so the link offers to pay)."""
    return PURPOSE[action or PAY]


@dataclass(frozen=True)
class Standing:
    customer: str
    case_id: int
    open_cases: int
    amount_due: int
    currency: str
    action: str
    service_ends_at: datetime | None
    locale: str | None


def of_customer(session: Session, stripe_customer_id: str) -> Standing | None:
    """The customer's standing, or None when no payment of theirs is being recovered."""
    open_cases = session.scalars(
        select(RecoveryCase)
        .where(
            RecoveryCase.stripe_customer_id == stripe_customer_id,
            RecoveryCase.status == CaseStatus.OPEN,
        )
        .order_by(RecoveryCase.final_action_at.is_(None), RecoveryCase.final_action_at)
        .order_by(RecoveryCase.opened_at)
    ).all()
    if not open_cases:
        return None
    first = open_cases[0]
    locale = session.scalar(
        select(Customer.locale).where(Customer.stripe_customer_id == stripe_customer_id)
    )
    due = sum(c.amount_due for c in open_cases if c.currency == first.currency)
    return Standing(
        customer=stripe_customer_id,
        case_id=first.id,
        open_cases=len(open_cases),
        amount_due=due,
        currency=first.currency,
        action=first.customer_action or PAY,
        service_ends_at=first.final_action_at,
        locale=locale,
    )


def fresh_link(
    session: Session, standing: Standing, now: datetime, settings: Settings, channel: str
) -> tuple[str, datetime]:
    """A new link to do what is asked, counted as `channel`'s (notice, app)."""
    purpose = link_purpose(standing.action)
    return links.handed_out(session, purpose, standing.case_id, now, settings, channel)


def is_open(session: Session, stripe_customer_id: str) -> bool:
    return bool(
        session.scalar(
            select(func.count())
            .select_from(RecoveryCase)
            .where(
                RecoveryCase.stripe_customer_id == stripe_customer_id,
                RecoveryCase.status == CaseStatus.OPEN,
            )
        )
    )
