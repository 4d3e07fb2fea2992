"""Stripe event → case changes. Every handler is idempotent and order-independent.

Handlers run inside the transaction that marks the inbox row processed, so an
event's effects and its "processed" mark commit together or not at all.
Where order matters (opening a case) we ask Stripe for the invoice's current
state rather than trust a possibly stale event.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import clock, engine, links, outbox, stripe_api
from recovery.classify import classify
from recovery.db import insert_ignore
from recovery.models import (
    AuditEntry,
    CaseStatus,
    Customer,
    RecoveryCase,
    RecoveryLink,
    can_move,
)

log = structlog.get_logger("recovery.events")

PROCESSED, IGNORED = "processed", "ignored"


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


def _id(value: Any) -> str | None:
    """An expandable field: either an id or the object carrying it."""
    if isinstance(value, dict):
        return value.get("id")
    return value if isinstance(value, str) else None


def _audit(session: Session, case: RecoveryCase | None, action: str, **detail: Any) -> None:
    session.add(
        AuditEntry(case_id=case.id if case else None, actor="stripe", action=action, detail=detail)
    )


# -- customers and cases ----------------------------------------------------------


def upsert_customer(session: Session, customer_id: str, **fields: Any) -> Customer:
    insert_ignore(
        session,
        Customer.__table__,
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


def case_for_update(session: Session, invoice_id: str) -> RecoveryCase | None:
    return session.scalars(
        select(RecoveryCase).where(RecoveryCase.invoice_id == invoice_id).with_for_update()
    ).one_or_none()


def close_case(
    session: Session, case: RecoveryCase, status: CaseStatus, now: datetime, **fields: Any
) -> bool:
    if not can_move(case.status, status):
        return False
    previous = case.status
    case.status = status.value
    case.closed_at = now
    for key, value in fields.items():
        setattr(case, key, value)
    engine.cancel_steps(session, case)
    links.revoke_case_links(session, case.id, now, "closed")
    if status is CaseStatus.RECOVERED:
        outbox.on_case_recovered(session, case, now)
    _audit(session, case, f"case_{status.value}", previous=previous)
    log.info("case_closed", case_id=case.id, invoice_id=case.invoice_id, status=status.value)
    return True


# -- the decline, from the charge or payment intent ------------------------------


def _latest_payment(invoice: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """(charge, payment_intent) of the invoice's latest attempt, fetched if needed."""
    charge = invoice.get("charge")
    intent = invoice.get("payment_intent")
    if isinstance(charge, str):
        charge = stripe_api.retrieve_charge(charge)
    if isinstance(intent, str):
        intent = stripe_api.retrieve_payment_intent(intent)
    if charge is None and intent is None:
        # Since API version 2025-03-31 invoices name their payments only
        # through InvoicePayment objects.
        payments = stripe_api.list_invoice_payments(invoice["id"]).get("data", [])
        if payments:
            payment = max(payments, key=lambda p: p.get("created") or 0).get("payment") or {}
            if _id(payment.get("payment_intent")):
                intent = stripe_api.retrieve_payment_intent(_id(payment["payment_intent"]))
            elif _id(payment.get("charge")):
                charge = stripe_api.retrieve_charge(_id(payment["charge"]))
    if charge is None and isinstance(intent, dict):
        latest = intent.get("latest_charge")
        charge = (
            latest
            if isinstance(latest, dict)
            else (stripe_api.retrieve_charge(latest) if isinstance(latest, str) else None)
        )
    return (
        charge if isinstance(charge, dict) else None,
        intent if isinstance(intent, dict) else None,
    )


def decline_details(invoice: dict[str, Any]) -> dict[str, Any]:
    charge, intent = _latest_payment(invoice)
    error = (intent or {}).get("last_payment_error") or {}
    outcome = (charge or {}).get("outcome") or {}
    method_details = (charge or {}).get("payment_method_details") or {}
    pm = error.get("payment_method") if isinstance(error.get("payment_method"), dict) else None
    if pm is None and isinstance((intent or {}).get("payment_method"), dict):
        pm = intent["payment_method"]
    card = method_details.get("card") or (pm or {}).get("card") or {}
    return {
        "charge_id": _id(charge) or error.get("charge"),
        "payment_intent_id": _id(intent),
        "failure_code": (charge or {}).get("failure_code") or error.get("code"),
        "decline_code": error.get("decline_code") or outcome.get("reason"),
        "advice_code": outcome.get("advice_code") or error.get("advice_code"),
        "network_advice_code": outcome.get("network_advice_code")
        or error.get("network_advice_code"),
        "network_decline_code": outcome.get("network_decline_code")
        or error.get("network_decline_code"),
        "outcome_type": outcome.get("type"),
        "payment_method_id": _id((charge or {}).get("payment_method")) or _id(pm),
        "payment_method_type": method_details.get("type")
        or (pm or {}).get("type")
        or ("card" if card else None),
        "card_brand": card.get("brand"),
        "card_fingerprint": card.get("fingerprint"),
        "card_last4": card.get("last4"),
        "card_exp_month": card.get("exp_month"),
        "card_exp_year": card.get("exp_year"),
    }


# -- handlers -------------------------------------------------------------------


def on_payment_failed(
    session: Session, event: dict, now: datetime, action_required: bool = False
) -> str:
    invoice = event["data"]["object"]
    invoice_id, created = invoice.get("id"), _ts(event["created"])
    if not invoice_id:
        return IGNORED
    case = case_for_update(session, invoice_id)
    if case is not None and case.status != CaseStatus.OPEN:
        log.info(
            "late_failure_ignored", invoice_id=invoice_id, case_id=case.id, case_status=case.status
        )
        return PROCESSED
    if case is None:
        current = stripe_api.retrieve_invoice(invoice_id)
        if current.get("status") != "open":
            # Paid, voided or uncollectible since: the event is stale.
            log.info(
                "failure_for_settled_invoice",
                invoice_id=invoice_id,
                invoice_status=current.get("status"),
            )
            return PROCESSED
        case = _open_case(session, invoice, now)
    if case.last_failure_at is not None and created < case.last_failure_at:
        log.info("stale_failure_ignored", invoice_id=invoice_id, case_id=case.id)
        return PROCESSED
    attempt = invoice.get("attempt_count") or 0
    if (
        not action_required
        and case.last_failure_at is not None
        and 0 < attempt <= (case.attempt_count)
    ):
        # This attempt's decline is already recorded, by our own retry (which
        # read it from Stripe's answer) or by this same event delivered twice:
        # no need to fetch it again or to plan anew.
        case.next_payment_attempt = _ts(invoice.get("next_payment_attempt"))
        log.info("failure_already_recorded", invoice_id=invoice_id, case_id=case.id)
        return PROCESSED

    case.last_failure_at = created
    case.first_failed_at = min(case.first_failed_at or created, created)
    case.attempt_count = max(case.attempt_count, invoice.get("attempt_count") or 0)
    case.next_payment_attempt = _ts(invoice.get("next_payment_attempt"))
    case.hosted_invoice_url = invoice.get("hosted_invoice_url") or case.hosted_invoice_url
    case.amount_due = invoice.get("amount_remaining", invoice.get("amount_due", case.amount_due))
    if action_required:
        case.needs_authentication = True
    details = decline_details(invoice)
    if details["decline_code"] == "authentication_required":
        case.needs_authentication = True
    for key, value in details.items():
        if value is not None:
            setattr(case, key, value)
    reading = classify(engine.failure_of(case))
    if case.first_category is None:
        case.first_decline_code = case.decline_code or case.failure_code
        case.first_category = reading.category.value
    stops_card = reading.stops_card
    engine.record_card_attempt(session, case, details["charge_id"], created, "stripe", stops_card)
    engine.plan_case(session, case, now)
    _audit(
        session,
        case,
        "payment_failed",
        event_id=event["id"],
        decline_code=case.decline_code,
        attempt_count=case.attempt_count,
    )
    log.info(
        "failure_recorded",
        case_id=case.id,
        invoice_id=invoice_id,
        decline_code=case.decline_code,
        attempt_count=case.attempt_count,
    )
    return PROCESSED


def _subscription_of(invoice: dict) -> str | None:
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return _id(details.get("subscription")) or _id(invoice.get("subscription"))


def _open_case(session: Session, invoice: dict, now: datetime) -> RecoveryCase:
    customer_id = _id(invoice.get("customer"))
    customer = None
    if customer_id:
        customer = upsert_customer(
            session,
            customer_id,
            email=invoice.get("customer_email"),
            name=invoice.get("customer_name"),
        )
    insert_ignore(
        session,
        RecoveryCase.__table__,
        {
            "invoice_id": invoice["id"],
            "customer_id": customer.id if customer else None,
            "stripe_customer_id": customer_id,
            "subscription_id": _subscription_of(invoice),
            "status": CaseStatus.OPEN.value,
            "livemode": bool(invoice.get("livemode")),
            "amount_due": invoice.get("amount_remaining", invoice.get("amount_due", 0)),
            "currency": (invoice.get("currency") or "usd").lower(),
            "attempt_count": 0,
            "needs_authentication": False,
            "opened_at": now,
            "updated_at": now,
        },
        ["invoice_id"],
    )
    case = case_for_update(session, invoice["id"])
    _audit(session, case, "case_opened")
    log.info("case_opened", case_id=case.id, invoice_id=case.invoice_id)
    return case


def on_action_required(session: Session, event: dict, now: datetime) -> str:
    return on_payment_failed(session, event, now, action_required=True)


def recovery_path_of_payment(session: Session, case: RecoveryCase) -> str:
    """Paid, not by our retry: through a pay or authenticate link of ours, or elsewhere."""
    clicked = session.scalar(
        select(RecoveryLink.id).where(
            RecoveryLink.case_id == case.id,
            RecoveryLink.purpose.in_(("pay", "authenticate")),
            RecoveryLink.click_count > 0,
        )
    )
    return "link" if clicked else "paid_elsewhere"


def _closing(status: CaseStatus, amount_field: str | None = None):
    def handler(session: Session, event: dict, now: datetime) -> str:
        invoice = event["data"]["object"]
        case = case_for_update(session, invoice.get("id") or "")
        if case is None:
            return PROCESSED
        fields = {"amount_recovered": invoice.get(amount_field)} if amount_field else {}
        if status is CaseStatus.RECOVERED and case.status == CaseStatus.OPEN.value:
            fields["recovery_path"] = recovery_path_of_payment(session, case)
        if not close_case(session, case, status, now, **fields):
            log.info("case_already_closed", case_id=case.id, status=case.status)
        return PROCESSED

    return handler


def on_subscription_changed(session: Session, event: dict, now: datetime) -> str:
    subscription = event["data"]["object"]
    if event["type"] != "customer.subscription.deleted" and subscription.get("status") != (
        "canceled"
    ):
        return PROCESSED
    cases = session.scalars(
        select(RecoveryCase)
        .where(
            RecoveryCase.subscription_id == subscription.get("id"),
            RecoveryCase.status == CaseStatus.OPEN.value,
        )
        .with_for_update()
    ).all()
    for case in cases:
        close_case(session, case, CaseStatus.CANCELED, now)
    return PROCESSED


def _card_change_customer(event: dict) -> str | None:
    obj, kind = event["data"]["object"], event["type"]
    if kind.startswith("payment_method.") or kind == "setup_intent.succeeded":
        return _id(obj.get("customer"))
    if kind == "checkout.session.completed":
        return _id(obj.get("customer")) if obj.get("mode") == "setup" else None
    if kind == "customer.updated":
        previous = event["data"].get("previous_attributes") or {}
        settings_changed = "default_payment_method" in (previous.get("invoice_settings") or {})
        if settings_changed or "default_source" in previous:
            return obj.get("id")
    return None


def _make_saved_card_default(session: Session, event: dict, customer_id: str) -> None:
    """A card saved through our setup link becomes the one invoices use.

    Checkout in setup mode only attaches the card; Stripe charges an invoice
    to the subscription's default card, else the customer's, so both are set
    (the subscription's only where it names one)."""
    intent_id = _id(event["data"]["object"].get("setup_intent"))
    if not intent_id:
        return
    pm_id = _id(stripe_api.retrieve_setup_intent(intent_id).get("payment_method"))
    if not pm_id:
        return
    stripe_api.set_default_payment_method(customer_id, pm_id, f"default-pm-{event['id']}")
    subscriptions = session.scalars(
        select(RecoveryCase.subscription_id).where(
            RecoveryCase.stripe_customer_id == customer_id,
            RecoveryCase.status == CaseStatus.OPEN.value,
            RecoveryCase.subscription_id.is_not(None),
        )
    ).all()
    for subscription_id in set(subscriptions):
        if stripe_api.retrieve_subscription(subscription_id).get("default_payment_method"):
            stripe_api.update_subscription(
                subscription_id,
                f"default-pm-{event['id']}-{subscription_id}",
                default_payment_method=pm_id,
            )


def on_card_changed(session: Session, event: dict, now: datetime) -> str:
    customer_id = _card_change_customer(event)
    if not customer_id:
        return IGNORED
    if event["type"] == "checkout.session.completed":
        _make_saved_card_default(session, event, customer_id)
    changed_at = _ts(event["created"])
    customer = upsert_customer(session, customer_id)
    if customer.card_updated_at is None or changed_at > customer.card_updated_at:
        customer.card_updated_at = changed_at
    if event["type"] == "customer.updated":
        obj = event["data"]["object"]
        settings = obj.get("invoice_settings") or {}
        customer.default_payment_method = _id(settings.get("default_payment_method"))
        customer.locale = next(iter(obj.get("preferred_locales") or []), customer.locale)
    open_cases = session.scalars(
        select(RecoveryCase)
        .where(
            RecoveryCase.customer_id == customer.id, RecoveryCase.status == CaseStatus.OPEN.value
        )
        .with_for_update()
    ).all()
    for case in open_cases:
        _audit(session, case, "card_updated", event_id=event["id"], event_type=event["type"])
        engine.on_card_updated(session, case, changed_at, now)
    log.info("card_updated", customer_id=customer.id, open_cases=len(open_cases))
    return PROCESSED


def on_card_expiring(session: Session, event: dict, now: datetime) -> str:
    """Pre-dunning: one email per card and expiry, before a renewal fails."""
    card = event["data"]["object"]
    customer_id = _id(card.get("customer"))
    month, year = card.get("exp_month"), card.get("exp_year")
    if not customer_id or not month or not year:
        return IGNORED
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
        f"card_expiring:{card.get('brand') or 'card'}:{card.get('last4') or ''}:{year}-{month}",
        now,
        customer_id=customer.id,
    )
    return PROCESSED


Handler = Callable[[Session, dict, datetime], str]

HANDLERS: dict[str, Handler] = {
    "invoice.payment_failed": on_payment_failed,
    "invoice.payment_action_required": on_action_required,
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


def handle_event(session: Session, event: dict, now: datetime, livemode: bool) -> str:
    """Apply one event; returns the inbox status it ends in (processed or ignored)."""
    if bool(event.get("livemode")) != livemode:
        log.warning(
            "event_mode_mismatch", event_id=event.get("id"), event_livemode=event.get("livemode")
        )
        return IGNORED
    handler = HANDLERS.get(event.get("type", ""))
    if handler is None:
        return IGNORED
    return handler(session, event, now)
