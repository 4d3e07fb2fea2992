"""What a click on a recovery link leads to. Synchronous: the web app runs it
in a worker thread.

Open case (or a customer's pre-dunning link): a Stripe page made at click
time, a Checkout Session in setup mode to save a new card, or the invoice's
hosted page to pay or authenticate; we redirect only to an address Stripe
returned, and only on Stripe's hosts. Paid: an "all set" page. Anything else
(unknown, expired, revoked, a closed case) is one and the same page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import structlog

from recovery import links, ratelimit, stripe_api
from recovery.config import Settings
from recovery.db import get_engine, session_scope
from recovery.models import CaseStatus, Customer

log = structlog.get_logger("recovery.redeem")

STRIPE_HOSTS = frozenset(
    {"checkout.stripe.com", "invoice.stripe.com", "pay.stripe.com", "billing.stripe.com"}
)


@dataclass(frozen=True)
class Answer:
    status: int
    page: str | None = None  # a template under templates/pages
    location: str | None = None


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


def redeem(token: str, now: datetime, settings: Settings) -> Answer:
    with get_engine().connect() as conn:
        # One statement, committed as it runs: a click costs one round trip.
        conn.execution_options(isolation_level="AUTOCOMMIT")
        found = links.click(conn, token, now)
    if found is None or found.purpose == links.Purpose.OPT_OUT.value:
        return INVALID
    if found.case_status == CaseStatus.RECOVERED.value:
        return ALL_SET
    if not found.live or found.case_status not in (None, CaseStatus.OPEN.value):
        return INVALID
    try:
        url = _stripe_page(found, settings)
    except stripe_api.StripeFailure as exc:
        log.warning("link_stripe_failed", link_id=found.link_id, error=type(exc).__name__)
        return UNAVAILABLE
    if not allowed_redirect(url, settings):
        log.error("link_redirect_refused", link_id=found.link_id, host=urlsplit(url or "").hostname)
        return UNAVAILABLE
    log.info("link_redeemed", link_id=found.link_id, purpose=found.purpose)
    return Answer(303, location=url)


def _stripe_page(found: links.Clicked, settings: Settings) -> str | None:
    if found.purpose in (links.Purpose.PAY.value, links.Purpose.AUTHENTICATE.value):
        if found.hosted_invoice_url:
            return found.hosted_invoice_url
        return stripe_api.retrieve_invoice(found.invoice_id).get("hosted_invoice_url")
    if not found.stripe_customer_id:
        return None
    ratelimit.acquire()
    session = stripe_api.create_setup_checkout_session(
        found.stripe_customer_id,
        success_url=f"{settings.public_base_url}/r/card-saved",
        cancel_url=f"{settings.public_base_url}/r/not-saved",
        # Each click gets its own session: a link clicked again after the
        # first session expired must still work.
        idempotency_key=f"link-{found.link_id}-{links.new_token()[:16]}",
        currency=found.currency,
    )
    return session.get("url")


def opt_out(token: str, now: datetime) -> Answer:
    """Stop reminders for the link's customer, at once."""
    with session_scope() as session:
        found = links.click(session.connection(), token, now)
        if found is None or found.purpose != links.Purpose.OPT_OUT.value or not found.live:
            return INVALID
        customer = session.get(Customer, found.customer_id)
        if customer.reminders_opted_out_at is None:
            customer.reminders_opted_out_at = now
            log.info("customer_opted_out", customer_id=customer.id)
    return Answer(200, "opt_out")


def opt_out_valid(token: str, now: datetime) -> bool:
    with get_engine().connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        found = links.click(conn, token, now)
    return found is not None and found.purpose == links.Purpose.OPT_OUT.value and found.live
