"""Recovery links: one click from an email to a Stripe page.

A token is 256 random bits; only its SHA-256 is stored, so a copy of the
database opens no one's payment page. A link has a purpose and an expiry, is
revoked when its case closes, and is superseded by the next link minted for
the same case (or customer) and purpose.

What a click leads to (synchronous: the web app runs it in a worker thread):
an open case's card link lands on one page of ours that offers both ways out,
without a login: pay the amount due now (Stripe's hosted invoice page, any
card) or save a new card that we then charge at once (a Checkout Session in
setup mode, made when chosen). An authentication link goes straight to the
hosted invoice page, a customer's pre-dunning link straight to Checkout. We
redirect only to an address Stripe returned, and only on Stripe's hosts.
Paid: an "all set" page. Anything else (unknown, expired, revoked, a closed
case) is one and the same page.

The choice is a POST: a mail scanner that follows every link with GET makes
no Stripe session and chooses nothing.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy import Connection, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from recovery import stripe_api
from recovery.config import Settings
from recovery.db import get_engine, rows_changed, session_scope
from recovery.models import (
    CaseStatus,
    Customer,
    LinkPurpose,
    LinkRevoked,
    RecoveryCase,
    RecoveryLink,
)

log = structlog.get_logger("recovery.links")

# An opt-out link must keep working in an old email for a long while.
OPT_OUT_TTL = timedelta(days=365)


def new_token(short: bool = False) -> str:
    # An SMS holds 70 characters in most scripts: its link's token is 96
    # bits, still past guessing behind the clicks-per-minute limit.
    return secrets.token_urlsafe(12 if short else 32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Wanted:
    """A link to mint: what for, and whose (a case's, or only a customer's)."""

    purpose: LinkPurpose
    case_id: int | None = None
    customer_id: int | None = None


def url(settings: Settings, purpose: LinkPurpose, token: str) -> str:
    route = "u" if purpose is LinkPurpose.OPT_OUT else "r"
    return f"{settings.public_base_url}/{route}/{token}"


def mint_many(
    session: Session,
    wanted: list[Wanted],
    now: datetime,
    ttl: timedelta,
    supersede: bool = True,
    short: bool = False,
    channel: str = "email",
) -> list[str]:
    """New links, superseding older ones of the same owner and purpose unless
    told not to (a link handed to the business's app leaves the one in the
    customer's email working); returns their tokens, in order, which are
    never stored."""
    if not wanted:
        return []
    if any(w.case_id is None and w.customer_id is None for w in wanted):
        raise ValueError("a link belongs to a case or a customer")
    for purpose in sorted({w.purpose for w in wanted} - {LinkPurpose.OPT_OUT} if supersede else ()):
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
                RecoveryLink.purpose == purpose,
                RecoveryLink.revoked_at.is_(None),
            )
            .values(revoked_at=now, revoked_reason=LinkRevoked.SUPERSEDED)
        )
    tokens = [new_token(short) for _ in wanted]
    session.execute(
        insert(RecoveryLink),
        [
            {
                "case_id": w.case_id,
                "customer_id": w.customer_id,
                "token_hash": token_hash(token),
                "purpose": w.purpose,
                "expires_at": now + (OPT_OUT_TTL if w.purpose is LinkPurpose.OPT_OUT else ttl),
                "click_count": 0,
                "channel": channel,
                "created_at": now,
            }
            for w, token in zip(wanted, tokens, strict=True)
        ],
    )
    return tokens


def handed_out(
    session: Session,
    purpose: LinkPurpose,
    case_id: int,
    now: datetime,
    settings: Settings,
    channel: str,
    short: bool = False,
) -> tuple[str, datetime]:
    """A link handed to the customer beside the email's, which keeps working
    (a webhook, the status API, the notice, an SMS with `short`). Its URL,
    and when it expires."""
    ttl = timedelta(days=settings.link_ttl_days)
    wanted = [Wanted(purpose, case_id=case_id)]
    token = mint_many(session, wanted, now, ttl, supersede=False, short=short, channel=channel)[0]
    return url(settings, purpose, token), now + ttl


def mint(
    session: Session,
    purpose: LinkPurpose,
    now: datetime,
    ttl: timedelta,
    case_id: int | None = None,
    customer_id: int | None = None,
) -> str:
    """One new link; returns its token."""
    return mint_many(session, [Wanted(purpose, case_id, customer_id)], now, ttl)[0]


def revoke_case_links(session: Session, case_id: int, now: datetime, reason: LinkRevoked) -> int:
    """Revoke a case's live links (opt-out links live on: they are the customer's)."""
    return rows_changed(
        session.execute(
            update(RecoveryLink)
            .where(
                RecoveryLink.case_id == case_id,
                RecoveryLink.revoked_at.is_(None),
                RecoveryLink.purpose != LinkPurpose.OPT_OUT,
            )
            .values(revoked_at=now, revoked_reason=reason)
        )
    )


@dataclass(frozen=True)
class Clicked:
    """A link as found at click time, with what the redirect needs."""

    link_id: int
    purpose: LinkPurpose
    live: bool  # neither expired nor revoked
    case_status: CaseStatus | None
    invoice_id: str | None
    hosted_invoice_url: str | None
    currency: str | None
    stripe_customer_id: str | None
    customer_id: int | None
    amount_due: int | None = None


_CLICKED = (
    RecoveryLink.id,
    RecoveryLink.customer_id,
    RecoveryLink.purpose,
    RecoveryLink.expires_at,
    RecoveryLink.revoked_at,
)
_OWNER = (
    RecoveryCase.amount_due,
    RecoveryCase.status,
    RecoveryCase.invoice_id,
    RecoveryCase.hosted_invoice_url,
    RecoveryCase.currency,
    func.coalesce(Customer.stripe_customer_id, RecoveryCase.stripe_customer_id),
)


# Built once: constructing a CTE statement per click cost more CPU than the
# database spent on it. Executions only bind the token's hash and the time.
# Only a link that still leads somewhere is counted (and found): a live one,
# or a recovered case's, which says "all set". An expired or revoked link then
# does what a forged token does, an index probe that changes no row, so the
# time a click takes tells them apart no better than the page does.
_RECOVERED_CASES = select(RecoveryCase.id).where(RecoveryCase.status == CaseStatus.RECOVERED)
_COUNT_CLICK = (
    update(RecoveryLink)
    .where(
        RecoveryLink.token_hash == bindparam("hash_of_token"),
        or_(
            RecoveryLink.revoked_at.is_(None) & (RecoveryLink.expires_at > bindparam("clicked_at")),
            RecoveryLink.case_id.in_(_RECOVERED_CASES),
        ),
    )
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
    """Record a click on the token's link and read it and its case; None for
    a token that leads nowhere (forged, expired, revoked), alike.

    On PostgreSQL this is one statement (the UPDATE in a CTE joined to the
    case): a click costs one round trip.
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
    amount_due, status, invoice_id, hosted, currency, stripe_customer = row[-6:]
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
        amount_due=amount_due,
    )


# -- clicks --------------------------------------------------------------------------

STRIPE_HOSTS = frozenset(
    {"checkout.stripe.com", "invoice.stripe.com", "pay.stripe.com", "billing.stripe.com"}
)


@dataclass(frozen=True)
class Answer:
    status: int
    page: str | None = None  # a template under templates/pages
    location: str | None = None
    values: dict[str, Any] | None = None  # for the page


class Choice(enum.StrEnum):
    """What the customer chose on the card link's page."""

    PAY = "pay"  # pay the amount due now, on the hosted invoice page
    CARD = "card"  # save a new card; our retry charges it at once


INVALID = Answer(404, "link_invalid")
ALL_SET = Answer(200, "all_set")
UNAVAILABLE = Answer(503, "unavailable")


def allowed_redirect(url: str | None, settings: Settings) -> bool:
    """Stripe's own hosts over https, or the configured Stripe-compatible server."""
    if not url:
        return False
    parts = urlsplit(url)
    if parts.username or parts.password:
        return False
    if parts.scheme == "https" and parts.hostname in STRIPE_HOSTS and parts.port is None:
        return True
    if settings.stripe_api_base:
        base = urlsplit(settings.stripe_api_base)
        return (parts.scheme, parts.netloc) == (base.scheme, base.netloc)
    return False


def redeem(token: str, now: datetime, settings: Settings, choice: Choice | None = None) -> Answer:
    """A click (choice None) or a choice made on the card link's page."""
    with get_engine().connect() as conn:
        # One statement, committed as it runs: a click costs one round trip.
        conn.execution_options(isolation_level="AUTOCOMMIT")
        found = click(conn, token, now)
    if found is None or found.purpose is LinkPurpose.OPT_OUT:
        return INVALID
    if found.case_status is CaseStatus.RECOVERED:
        return ALL_SET
    if not found.live or found.case_status not in (None, CaseStatus.OPEN):
        return INVALID
    offers_both = found.purpose in (LinkPurpose.UPDATE_CARD, LinkPurpose.PAY) and bool(
        found.invoice_id
    )
    if offers_both and choice is None:
        return _choose(found)
    if choice is not None and not offers_both:
        return INVALID
    try:
        url = _stripe_page(found, settings, choice)
    except stripe_api.StripeFailure as exc:
        log.warning("link_stripe_failed", link_id=found.link_id, error=type(exc).__name__)
        return UNAVAILABLE
    if not allowed_redirect(url, settings):
        log.error("link_redirect_refused", link_id=found.link_id, host=urlsplit(url or "").hostname)
        return UNAVAILABLE
    log.info("link_redeemed", link_id=found.link_id, purpose=found.purpose)
    return Answer(303, location=url)


def _choose(found: Clicked) -> Answer:
    # The page writes the amount in its reader's locale.
    return Answer(
        200, "choose", values={"amount_due": found.amount_due, "currency": found.currency}
    )


def _stripe_page(found: Clicked, settings: Settings, choice: Choice | None) -> str | None:
    pays = choice is Choice.PAY or (choice is None and found.purpose is not LinkPurpose.UPDATE_CARD)
    if pays:
        if found.hosted_invoice_url:
            return found.hosted_invoice_url
        if not found.invoice_id:
            return None
        return stripe_api.retrieve_invoice(found.invoice_id).get("hosted_invoice_url")
    if not found.stripe_customer_id:
        return None
    session = stripe_api.create_setup_checkout_session(
        found.stripe_customer_id,
        success_url=f"{settings.public_base_url}/r/card-saved",
        cancel_url=f"{settings.public_base_url}/r/not-saved",
        # Each click gets its own session: a link clicked again after the
        # first session expired must still work.
        idempotency_key=f"link-{found.link_id}-{new_token()[:16]}",
        currency=found.currency,
    )
    return session.get("url")


def opt_out(token: str, now: datetime) -> Answer:
    """Stop reminders for the link's customer, at once."""
    with session_scope() as session:
        found = click(session.connection(), token, now)
        if found is None or found.purpose is not LinkPurpose.OPT_OUT or not found.live:
            return INVALID
        customer = session.get(Customer, found.customer_id)
        if customer is not None and customer.reminders_opted_out_at is None:
            customer.reminders_opted_out_at = now
            log.info("customer_opted_out", customer_id=customer.id)
    return Answer(200, "opt_out")


def opt_out_valid(token: str, now: datetime) -> bool:
    with get_engine().connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        found = click(conn, token, now)
    return found is not None and found.purpose is LinkPurpose.OPT_OUT and found.live
