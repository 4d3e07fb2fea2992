"""Stripe event → calls on cases. Handlers only: every change to a case is made
by engine/cases.py, every reading of Stripe's objects by stripe_api.py.

Handlers run inside the transaction that marks the inbox row processed, so an
event's effects and its "processed" mark commit together or not at all. Where
order matters (opening a case) we ask Stripe for the invoice's current state
rather than trust a possibly stale event.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import clock, stripe_api
from recovery.config import Settings
from recovery.customers import outbox, zones
from recovery.db import insert_ignore
from recovery.engine import cases
from recovery.models import (
    CaseStatus,
    Customer,
    EventStatus,
    LinkPurpose,
    RecoveryCase,
    RecoveryLink,
    RecoveryPath,
)

log = structlog.get_logger("recovery.events")

Event = dict[str, Any]
Handler = Callable[[Session, Event, datetime, Settings], EventStatus]


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


def _created(event: Event) -> datetime:
    return datetime.fromtimestamp(event["created"], UTC)


def upsert_customer(session: Session, customer_id: str, **fields: Any) -> Customer:
    """The customer's row, locked, with the fields Stripe told us set."""
    insert_ignore(
        session,
        Customer,
        {
            "stripe_customer_id": customer_id,
            "created_at": clock.now(),
            "updated_at": clock.now(),
        },
        ["stripe_customer_id"],
    )
    customer = session.scalars(
        select(Customer).where(Customer.stripe_customer_id == customer_id).with_for_update()
    ).one()
    for key, value in fields.items():
        if value is not None:
            setattr(customer, key, value)
    return customer


# -- failures ------------------------------------------------------------------------


def on_payment_failed(
    session: Session, event: Event, now: datetime, settings: Settings
) -> EventStatus:
    invoice = event["data"]["object"]
    invoice_id = invoice.get("id")
    if not invoice_id:
        return EventStatus.IGNORED
    case = cases.for_invoice(session, invoice_id)
    if case is None:
        case = _open_case(session, invoice, now)
    report = cases.FailureReport(
        event_id=event["id"],
        created=_created(event),
        attempt_count=invoice.get("attempt_count") or 0,
        next_payment_attempt=_ts(invoice.get("next_payment_attempt")),
        hosted_invoice_url=invoice.get("hosted_invoice_url"),
        amount_due=invoice.get("amount_remaining", invoice.get("amount_due")),
        action_required=event["type"] == "invoice.payment_action_required",
    )
    verdict = cases.record_failure(
        session,
        case,
        report,
        lambda: stripe_api.decline_details(invoice, at=report.created),
        now,
        settings,
    )
    if verdict is not cases.Verdict.RECORDED:
        log.info("failure_not_applied", invoice_id=invoice_id, case_id=case.id, why=verdict.value)
    return EventStatus.PROCESSED


def _open_case(session: Session, invoice: Event, now: datetime) -> RecoveryCase:
    """The invoice's case, opened as Stripe has things now: webhooks lag, and
    a failure may arrive after the invoice was paid, voided or written off,
    or its subscription ended (late, replayed, out of order). Such a case is
    recorded closed, with how it closed, so the figures stay complete."""
    current = stripe_api.retrieve_invoice_state(invoice["id"])
    customer_id = stripe_api.id_of(invoice.get("customer"))
    customer = (
        upsert_customer(
            session,
            customer_id,
            email=invoice.get("customer_email"),
            name=invoice.get("customer_name"),
            timezone=zones.zone_of_address(invoice.get("customer_address")),
        )
        if customer_id
        else None
    )
    case = cases.open_case(session, invoice, customer.id if customer else None, now)
    settled = _SETTLED.get(current.get("status") or "")
    if settled is CaseStatus.RECOVERED:
        cases.close(
            session,
            case,
            settled,
            now,
            amount_recovered=current.get("amount_paid"),
            recovery_path=RecoveryPath.PAID_ELSEWHERE,
        )
    elif settled is not None:
        cases.close(session, case, settled, now)
    elif stripe_api.subscription_canceled(current):
        cases.close(session, case, CaseStatus.CANCELED, now)
    if case.status is not CaseStatus.OPEN:
        log.info("case_opened_closed", case_id=case.id, status=case.status.value)
    return case


# An invoice Stripe says is settled, and the state of its case.
_SETTLED = {
    "paid": CaseStatus.RECOVERED,
    "void": CaseStatus.VOIDED,
    "uncollectible": CaseStatus.UNCOLLECTIBLE,
}


# -- payment, voiding, cancellation ----------------------------------------------------------


def recovery_path_of_payment(session: Session, case: RecoveryCase) -> RecoveryPath:
    """Paid, not by our retry: after a click on a link of ours (whose page
    offers to pay now), or elsewhere."""
    clicked = session.scalar(
        select(RecoveryLink.id).where(
            RecoveryLink.case_id == case.id,
            RecoveryLink.purpose.in_(
                (LinkPurpose.PAY, LinkPurpose.UPDATE_CARD, LinkPurpose.AUTHENTICATE)
            ),
            RecoveryLink.click_count > 0,
        )
    )
    return RecoveryPath.LINK if clicked else RecoveryPath.PAID_ELSEWHERE


def _closing(status: CaseStatus, amount_field: str | None = None) -> Handler:
    def handler(session: Session, event: Event, now: datetime, settings: Settings) -> EventStatus:
        invoice = event["data"]["object"]
        case = cases.for_invoice(session, invoice.get("id") or "")
        if case is None:
            return EventStatus.PROCESSED
        fields: dict[str, Any] = (
            {"amount_recovered": invoice.get(amount_field)} if amount_field else {}
        )
        if status is CaseStatus.RECOVERED and case.status is CaseStatus.OPEN:
            fields["recovery_path"] = recovery_path_of_payment(session, case)
        if not cases.close(session, case, status, now, **fields):
            log.info("case_already_closed", case_id=case.id, status=case.status.value)
        return EventStatus.PROCESSED

    return handler


def on_subscription_changed(
    session: Session, event: Event, now: datetime, settings: Settings
) -> EventStatus:
    subscription = event["data"]["object"]
    if event["type"] != "customer.subscription.deleted" and subscription.get("status") != (
        "canceled"
    ):
        return EventStatus.PROCESSED
    open_cases = session.scalars(
        select(RecoveryCase)
        .where(
            RecoveryCase.subscription_id == subscription.get("id"),
            RecoveryCase.status == CaseStatus.OPEN,
        )
        .with_for_update()
    ).all()
    for case in open_cases:
        cases.close(session, case, CaseStatus.CANCELED, now)
    return EventStatus.PROCESSED


# -- cards ---------------------------------------------------------------------------


def _card_change_customer(event: Event) -> str | None:
    obj, kind = event["data"]["object"], event["type"]
    if kind.startswith("payment_method.") or kind == "setup_intent.succeeded":
        return stripe_api.id_of(obj.get("customer"))
    if kind == "checkout.session.completed":
        return stripe_api.id_of(obj.get("customer")) if obj.get("mode") == "setup" else None
    if kind == "customer.updated":
        previous = event["data"].get("previous_attributes") or {}
        settings_changed = "default_payment_method" in (previous.get("invoice_settings") or {})
        if settings_changed or "default_source" in previous:
            found = obj.get("id")
            return found if isinstance(found, str) else None
    return None


def _make_saved_card_default(session: Session, event: Event, customer_id: str) -> str | None:
    """A card saved through our setup link becomes the one invoices use; its
    payment method, or None.

    Checkout in setup mode only attaches the card; Stripe charges an invoice
    with the invoice's default card, else the subscription's, else the
    customer's. So the customer's default is set, and the subscription's
    where it names one of its own (Checkout-made subscriptions do); the retry
    that follows pays with this card explicitly, past an invoice's own."""
    intent_id = stripe_api.id_of(event["data"]["object"].get("setup_intent"))
    if not intent_id:
        return None
    pm_id = stripe_api.id_of(stripe_api.retrieve_setup_intent(intent_id).get("payment_method"))
    if not pm_id:
        return None
    stripe_api.set_default_payment_method(customer_id, pm_id, f"default-pm-{event['id']}")
    subscriptions = session.scalars(
        select(RecoveryCase.subscription_id).where(
            RecoveryCase.stripe_customer_id == customer_id,
            RecoveryCase.status == CaseStatus.OPEN,
            RecoveryCase.subscription_id.is_not(None),
        )
    ).all()
    for subscription_id in sorted({s for s in subscriptions if s}):
        if stripe_api.retrieve_subscription(subscription_id).get("default_payment_method"):
            stripe_api.update_subscription(
                subscription_id,
                f"default-pm-{event['id']}-{subscription_id}",
                default_payment_method=pm_id,
            )
    return pm_id


def on_card_changed(
    session: Session, event: Event, now: datetime, settings: Settings
) -> EventStatus:
    customer_id = _card_change_customer(event)
    if not customer_id:
        return EventStatus.IGNORED
    saved = (
        _make_saved_card_default(session, event, customer_id)
        if event["type"] == "checkout.session.completed"
        else None
    )
    changed_at = _created(event)
    customer = upsert_customer(session, customer_id)
    if saved:
        customer.saved_payment_method = saved
    if customer.card_updated_at is None or changed_at > customer.card_updated_at:
        customer.card_updated_at = changed_at
    if event["type"] == "customer.updated":
        obj = event["data"]["object"]
        invoice_settings = obj.get("invoice_settings") or {}
        customer.default_payment_method = stripe_api.id_of(
            invoice_settings.get("default_payment_method")
        )
        if customer.default_payment_method not in (None, customer.saved_payment_method):
            # A card chosen since, elsewhere (the portal, the business).
            customer.saved_payment_method = None
        customer.locale = next(iter(obj.get("preferred_locales") or []), customer.locale)
    open_cases = session.scalars(
        select(RecoveryCase)
        .where(RecoveryCase.customer_id == customer.id, RecoveryCase.status == CaseStatus.OPEN)
        .with_for_update()
    ).all()
    for case in open_cases:
        cases.card_updated(
            session,
            case,
            now,
            settings,
            event_id=event["id"],
            event_type=event["type"],
        )
    log.info("card_updated", customer_id=customer.id, open_cases=len(open_cases))
    return EventStatus.PROCESSED


def on_card_expiring(
    session: Session, event: Event, now: datetime, settings: Settings
) -> EventStatus:
    """Pre-dunning: one email per card and expiry, before a renewal fails."""
    card = event["data"]["object"]
    customer_id = stripe_api.id_of(card.get("customer"))
    month, year = card.get("exp_month"), card.get("exp_year")
    if not customer_id or not isinstance(month, int) or not isinstance(year, int):
        return EventStatus.IGNORED
    customer = upsert_customer(session, customer_id)
    if not customer.email:
        known = stripe_api.retrieve_customer(customer_id)
        customer.email, customer.name = known.get("email"), known.get("name") or customer.name
        customer.locale = next(iter(known.get("preferred_locales") or []), customer.locale)
    which = card.get("fingerprint") or card.get("id")
    outbox.enqueue(
        session,
        f"card_expiring:{customer_id}:{which}:{year}-{month:02d}",
        "card_expiring",
        "card_expiring",
        now,
        customer_id=customer.id,
        card=outbox.CardFacts(card.get("brand") or "card", card.get("last4"), month, year),
    )
    return EventStatus.PROCESSED


HANDLERS: dict[str, Handler] = {
    "invoice.payment_failed": on_payment_failed,
    "invoice.payment_action_required": on_payment_failed,
    "invoice.paid": _closing(CaseStatus.RECOVERED, "amount_paid"),
    "invoice.payment_succeeded": _closing(CaseStatus.RECOVERED, "amount_paid"),
    "invoice.voided": _closing(CaseStatus.VOIDED),
    "invoice.marked_uncollectible": _closing(CaseStatus.UNCOLLECTIBLE),
    "customer.subscription.updated": on_subscription_changed,
    "customer.subscription.deleted": on_subscription_changed,
    "payment_method.attached": on_card_changed,
    "payment_method.updated": on_card_changed,
    "payment_method.automatically_updated": on_card_changed,
    "customer.updated": on_card_changed,
    "setup_intent.succeeded": on_card_changed,
    "checkout.session.completed": on_card_changed,
    "customer.source.expiring": on_card_expiring,
}


def handle_event(session: Session, event: Event, now: datetime, settings: Settings) -> EventStatus:
    """Apply one event; returns the inbox status it ends in (processed or ignored)."""
    if bool(event.get("livemode")) != settings.stripe_livemode:
        log.warning(
            "event_mode_mismatch", event_id=event.get("id"), event_livemode=event.get("livemode")
        )
        return EventStatus.IGNORED
    handler = HANDLERS.get(event.get("type", ""))
    if handler is None:
        return EventStatus.IGNORED
    return handler(session, event, now, settings)
