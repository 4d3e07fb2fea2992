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

from sqlalchemy import Connection, bindparam, func, insert, or_, select, update
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


@dataclass(frozen=True)
class Wanted:
    """A link to mint: what for, and whose (a case's, or only a customer's)."""

    purpose: Purpose
    case_id: int | None = None
    customer_id: int | None = None


def mint_many(session: Session, wanted: list[Wanted], now: datetime, ttl: timedelta) -> list[str]:
    """New links, superseding older ones of the same owner and purpose; returns
    their tokens, in order, which are never stored."""
    if not wanted:
        return []
    if any(w.case_id is None and w.customer_id is None for w in wanted):
        raise ValueError("a link belongs to a case or a customer")
    for purpose in {w.purpose for w in wanted} - {Purpose.OPT_OUT}:
        of_purpose = [w for w in wanted if w.purpose is purpose]
        owners = [
            RecoveryLink.case_id.in_({w.case_id for w in of_purpose if w.case_id is not None}),
            RecoveryLink.customer_id.in_({w.customer_id for w in of_purpose if w.case_id is None})
            & RecoveryLink.case_id.is_(None),
        ]
        session.execute(
            update(RecoveryLink)
            .where(
                or_(*owners),
                RecoveryLink.purpose == purpose.value,
                RecoveryLink.revoked_at.is_(None),
            )
            .values(revoked_at=now, revoked_reason="superseded")
        )
    tokens = [new_token() for _ in wanted]
    session.execute(
        insert(RecoveryLink),
        [
            {
                "case_id": w.case_id,
                "customer_id": w.customer_id,
                "token_hash": token_hash(token),
                "purpose": w.purpose.value,
                "expires_at": now + (OPT_OUT_TTL if w.purpose is Purpose.OPT_OUT else ttl),
                "click_count": 0,
                "created_at": now,
            }
            for w, token in zip(wanted, tokens, strict=True)
        ],
    )
    return tokens


def mint(
    session: Session,
    purpose: Purpose,
    now: datetime,
    ttl: timedelta,
    case_id: int | None = None,
    customer_id: int | None = None,
) -> str:
    """One new link; returns its token."""
    return mint_many(session, [Wanted(purpose, case_id, customer_id)], now, ttl)[0]


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


_CLICKED = (
    RecoveryLink.id,
    RecoveryLink.customer_id,
    RecoveryLink.purpose,
    RecoveryLink.expires_at,
    RecoveryLink.revoked_at,
)
_OWNER = (
    RecoveryCase.status,
    RecoveryCase.invoice_id,
    RecoveryCase.hosted_invoice_url,
    RecoveryCase.currency,
    func.coalesce(Customer.stripe_customer_id, RecoveryCase.stripe_customer_id),
)


# Built once: constructing a CTE statement per click cost more CPU than the
# database spent on it. Executions only bind the token's hash and the time.
_COUNT_CLICK = (
    update(RecoveryLink)
    .where(RecoveryLink.token_hash == bindparam("hash_of_token"))
    .values(
        click_count=RecoveryLink.click_count + 1,
        first_clicked_at=func.coalesce(RecoveryLink.first_clicked_at, bindparam("clicked_at")),
        last_clicked_at=bindparam("clicked_at"),
    )
    .returning(*_CLICKED, RecoveryLink.case_id)
)
_CLICKED_CTE = _COUNT_CLICK.cte("clicked")
_CLICK_POSTGRES = (
    select(*_CLICKED_CTE.c, *_OWNER)
    .select_from(_CLICKED_CTE)
    .outerjoin(RecoveryCase, RecoveryCase.id == _CLICKED_CTE.c.case_id)
    .outerjoin(Customer, Customer.id == _CLICKED_CTE.c.customer_id)
)
_READ_CLICKED = (
    select(*_CLICKED, *_OWNER)
    .select_from(RecoveryLink)
    .outerjoin(RecoveryCase, RecoveryCase.id == RecoveryLink.case_id)
    .outerjoin(Customer, Customer.id == RecoveryLink.customer_id)
    .where(RecoveryLink.id == bindparam("clicked_link"))
)


def click(conn: Connection, token: str, now: datetime) -> Clicked | None:
    """Record a click on the token's link and read it and its case.

    On PostgreSQL this is one statement (the UPDATE in a CTE joined to the
    case): a click costs one round trip. A forged, an expired and a revoked
    token run the very same statement, so the time taken tells them apart no
    better than the page does.
    """
    values = {"hash_of_token": token_hash(token), "clicked_at": now}
    if conn.dialect.name == "postgresql":
        row = conn.execute(_CLICK_POSTGRES, values).one_or_none()
    else:  # SQLite: no UPDATE inside a CTE; the same two statements for every token
        found = conn.execute(_COUNT_CLICK, values).one_or_none()
        link_id = found.id if found is not None else -1
        row = conn.execute(_READ_CLICKED, {"clicked_link": link_id}).one_or_none()
    if row is None:
        return None
    link_id, customer_id, purpose, expires_at, revoked_at = row[:5]
    status, invoice_id, hosted, currency, stripe_customer = row[-5:]
    return Clicked(
        link_id=link_id,
        purpose=purpose,
        live=revoked_at is None and expires_at > now,
        case_status=status,
        invoice_id=invoice_id,
        hosted_invoice_url=hosted,
        currency=currency,
        stripe_customer_id=stripe_customer,
        customer_id=customer_id,
    )
