"""Recovery links: one click from an email to a Stripe page.

A token is 256 random bits; only its SHA-256 is stored, so a copy of the
database opens no one's payment page. A link has a purpose and an expiry, is
revoked when its case closes, and is superseded by the next link minted for
the same case (or customer) and purpose.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recovery.models import Customer, RecoveryCase, RecoveryLink

# An opt-out link must keep working in an old email for a long while.
OPT_OUT_TTL = timedelta(days=365)


class Purpose(StrEnum):
    PAY = "pay"
    UPDATE_CARD = "update_card"
    AUTHENTICATE = "authenticate"
    OPT_OUT = "opt_out"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def mint(
    session: Session,
    purpose: Purpose,
    now: datetime,
    ttl: timedelta,
    case_id: int | None = None,
    customer_id: int | None = None,
) -> str:
    """A new link; returns its token, which is never stored."""
    if case_id is None and customer_id is None:
        raise ValueError("a link belongs to a case or a customer")
    if purpose is not Purpose.OPT_OUT:
        owner = (
            RecoveryLink.case_id == case_id
            if case_id is not None
            else (RecoveryLink.customer_id == customer_id) & RecoveryLink.case_id.is_(None)
        )
        session.execute(
            update(RecoveryLink)
            .where(owner, RecoveryLink.purpose == purpose.value, RecoveryLink.revoked_at.is_(None))
            .values(revoked_at=now, revoked_reason="superseded")
        )
    token = new_token()
    session.add(
        RecoveryLink(
            case_id=case_id,
            customer_id=customer_id,
            token_hash=token_hash(token),
            purpose=purpose.value,
            expires_at=now + (OPT_OUT_TTL if purpose is Purpose.OPT_OUT else ttl),
            created_at=now,
        )
    )
    return token


def revoke_case_links(session: Session, case_id: int, now: datetime, reason: str) -> int:
    """Revoke a case's live links (opt-out links live on: they are the customer's)."""
    return session.execute(
        update(RecoveryLink)
        .where(
            RecoveryLink.case_id == case_id,
            RecoveryLink.revoked_at.is_(None),
            RecoveryLink.purpose != Purpose.OPT_OUT.value,
        )
        .values(revoked_at=now, revoked_reason=reason)
    ).rowcount


@dataclass(frozen=True)
class Clicked:
    """A link as found at click time, with what the redirect needs."""

    link_id: int
    purpose: str
    live: bool  # neither expired nor revoked
    case_status: str | None
    invoice_id: str | None
    hosted_invoice_url: str | None
    currency: str | None
    stripe_customer_id: str | None
    customer_id: int | None


def click(session: Session, token: str, now: datetime) -> Clicked | None:
    """Record a click on the token's link and read it.

    A forged token, an expired one and a revoked one run the same two
    statements, so the time taken tells them apart no better than the page.
    """
    row = session.execute(
        update(RecoveryLink)
        .where(RecoveryLink.token_hash == token_hash(token))
        .values(
            click_count=RecoveryLink.click_count + 1,
            first_clicked_at=func.coalesce(RecoveryLink.first_clicked_at, now),
            last_clicked_at=now,
        )
        .returning(
            RecoveryLink.id,
            RecoveryLink.customer_id,
            RecoveryLink.purpose,
            RecoveryLink.expires_at,
            RecoveryLink.revoked_at,
        )
    ).one_or_none()
    owner = session.execute(
        select(
            RecoveryCase.status,
            RecoveryCase.invoice_id,
            RecoveryCase.hosted_invoice_url,
            RecoveryCase.currency,
            func.coalesce(Customer.stripe_customer_id, RecoveryCase.stripe_customer_id),
        )
        .select_from(RecoveryLink)
        .outerjoin(RecoveryCase, RecoveryCase.id == RecoveryLink.case_id)
        .outerjoin(Customer, Customer.id == RecoveryLink.customer_id)
        .where(RecoveryLink.id == (row.id if row is not None else -1))
    ).one_or_none()
    if row is None or owner is None:
        return None
    status, invoice_id, hosted, currency, stripe_customer = owner
    return Clicked(
        link_id=row.id,
        purpose=row.purpose,
        live=row.revoked_at is None and row.expires_at > now,
        case_status=status,
        invoice_id=invoice_id,
        hosted_invoice_url=hosted,
        currency=currency,
        stripe_customer_id=stripe_customer,
        customer_id=row.customer_id,
    )
