"""Stripe objects for the simulator, each built from Stripe's own example object.

`fixtures.json` beside this file is a subset of Stripe's openapi fixtures3.json
(MIT, see LICENSE-stripe-fixtures). Every builder deep-copies the example and
sets only the fields a scenario needs, so shapes stay Stripe's.
"""

from __future__ import annotations

import copy
import json
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).with_name("fixtures.json")


@lru_cache(maxsize=1)
def _examples() -> dict[str, Any]:
    return json.loads(FIXTURES.read_text())["resources"]


def example(resource: str) -> dict[str, Any]:
    return copy.deepcopy(_examples()[resource])


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _list(data: list, url: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": False, "url": url}


def customer(now: int, email: str | None, name: str | None, livemode: bool) -> dict[str, Any]:
    obj = example("customer")
    obj.update(
        id=new_id("cus"),
        created=now,
        email=email,
        name=name,
        livemode=livemode,
        discount=None,
        metadata={},
    )
    obj["invoice_settings"]["default_payment_method"] = None
    return obj


def payment_method(now: int, customer_id: str | None, card: dict[str, Any], livemode: bool):
    obj = example("payment_method")
    obj.update(id=new_id("pm"), created=now, customer=customer_id, livemode=livemode, metadata={})
    obj["billing_details"].update(email=None, phone=None)
    details = obj["card"]
    brand = card.get("brand", details["brand"])
    details.update(
        brand=brand,
        display_brand=brand,
        exp_month=card.get("exp_month", details["exp_month"]),
        exp_year=card.get("exp_year", details["exp_year"]),
        last4=card.get("last4", details["last4"]),
        fingerprint=card.get("fingerprint") or secrets.token_hex(8),
        wallet=None,
    )
    details["networks"]["available"] = [brand]
    return obj


def subscription(now: int, customer_id: str, amount: int, currency: str, livemode: bool):
    obj = example("subscription")
    obj.update(
        id=new_id("sub"),
        created=now,
        start_date=now,
        customer=customer_id,
        currency=currency,
        livemode=livemode,
        status="active",
        cancel_at=None,
        canceled_at=None,
        ended_at=None,
        trial_end=None,
        trial_start=None,
        cancel_at_period_end=False,
        pending_update=None,
        pause_collection=None,
        latest_invoice=None,
        metadata={},
    )
    for item in obj["items"]["data"]:
        item["subscription"] = obj["id"]
        item["price"].update(currency=currency, unit_amount=amount, unit_amount_decimal=str(amount))
    return obj


def invoice(
    now: int,
    customer_obj: dict,
    subscription_id: str | None,
    amount: int,
    currency: str,
    base_url: str,
    livemode: bool,
) -> dict[str, Any]:
    obj = example("invoice")
    invoice_id = new_id("in")
    obj.update(
        id=invoice_id,
        created=now,
        effective_at=now,
        due_date=None,
        currency=currency,
        customer=customer_obj["id"],
        customer_email=customer_obj.get("email"),
        customer_name=customer_obj.get("name"),
        livemode=livemode,
        status="open",
        amount_due=amount,
        amount_paid=0,
        amount_remaining=amount,
        # The example's own figures belong to another invoice: nothing
        # overpaid, shipped or carried over on a plain renewal.
        amount_overpaid=0,
        amount_shipping=0,
        shipping_cost=None,
        starting_balance=0,
        ending_balance=0,
        pre_payment_credit_notes_amount=0,
        post_payment_credit_notes_amount=0,
        subtotal=amount,
        total=amount,
        subtotal_excluding_tax=amount,
        total_excluding_tax=amount,
        attempt_count=0,
        attempted=False,
        auto_advance=True,
        billing_reason="subscription_cycle",
        hosted_invoice_url=f"{base_url}/hosted/invoices/{invoice_id}",
        invoice_pdf=f"{base_url}/hosted/invoices/{invoice_id}/pdf",
        next_payment_attempt=None,
        last_finalization_error=None,
        from_invoice=None,
        subscription=subscription_id,
        period_start=now,
        period_end=now,
        metadata={},
        number=f"SIM-{invoice_id[-6:].upper()}",
        webhooks_delivered_at=now,
    )
    obj["parent"] = (
        {
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription_id},
            "type": "subscription_details",
        }
        if subscription_id
        else None
    )
    obj["status_transitions"].update(finalized_at=now, paid_at=None)
    for line in obj["lines"]["data"]:
        line.update(
            invoice=invoice_id, amount=amount, subtotal=amount, currency=currency, subscription=None
        )
    obj["lines"]["url"] = f"/v1/invoices/{invoice_id}/lines"
    return obj


def payment_intent(
    now: int, amount: int, currency: str, customer_id: str | None, pm_obj: dict, livemode: bool
):
    obj = example("payment_intent")
    intent_id = new_id("pi")
    obj.update(
        id=intent_id,
        created=now,
        amount=amount,
        currency=currency,
        customer=customer_id,
        payment_method=pm_obj["id"],
        livemode=livemode,
        canceled_at=None,
        client_secret=f"{intent_id}_secret_{secrets.token_hex(12)}",
        last_payment_error=None,
        next_action=None,
        processing=None,
        transfer_data=None,
        metadata={},
        shipping=None,
        payment_method_configuration_details=None,
        confirmation_method="automatic",
    )
    return obj


def charge(now: int, intent: dict, pm_obj: dict, livemode: bool) -> dict[str, Any]:
    obj = example("charge")
    card = pm_obj["card"]
    obj.update(
        id=new_id("ch"),
        created=now,
        amount=intent["amount"],
        currency=intent["currency"],
        customer=intent["customer"],
        payment_intent=intent["id"],
        payment_method=pm_obj["id"],
        livemode=livemode,
        balance_transaction=None,
        metadata={},
        description=None,
        amount_captured=0,
        amount_refunded=0,
    )
    obj["billing_details"].update(name=None, email=None)
    details = obj["payment_method_details"]["card"]
    if details.get("overcapture"):
        details["overcapture"].update(maximum_amount_capturable=intent["amount"])
    details.update(
        brand=card["brand"],
        network=card["brand"],
        exp_month=card["exp_month"],
        exp_year=card["exp_year"],
        last4=card["last4"],
        fingerprint=card["fingerprint"],
    )
    obj["refunds"] = _list([], f"/v1/charges/{obj['id']}/refunds")
    return obj


def invoice_payment(now: int, invoice_obj: dict, intent: dict, status: str, livemode: bool):
    obj = example("invoice_payment")
    obj.update(
        id=new_id("inpay"),
        created=now,
        invoice=invoice_obj["id"],
        currency=intent["currency"],
        amount_requested=intent["amount"],
        amount_paid=intent["amount"] if status == "paid" else 0,
        livemode=livemode,
        status=status,
        is_default=True,
    )
    obj["payment"] = {"type": "payment_intent", "payment_intent": intent["id"]}
    obj["status_transitions"] = {"canceled_at": None, "paid_at": now if status == "paid" else None}
    return obj


def checkout_session(
    now: int, params: dict, base_url: str, livemode: bool, total: tuple[int, str] | None
):
    """Setup mode with no `total`; payment mode charging `total` (amount, currency)."""
    obj = example("checkout.session")
    session_id = f"cs_{'live' if livemode else 'test'}_{secrets.token_hex(16)}"
    amount, currency = total if total else (None, params.get("currency"))
    obj.update(
        id=session_id,
        created=now,
        expires_at=now + 24 * 3600,
        mode="payment" if total else "setup",
        payment_status="unpaid" if total else "no_payment_required",
        customer=params.get("customer"),
        success_url=params.get("success_url"),
        cancel_url=params.get("cancel_url"),
        livemode=livemode,
        payment_intent=None,
        status="open",
        url=f"{base_url}/hosted/checkout/{session_id}",
        amount_subtotal=amount,
        amount_total=amount,
        currency=currency,
        total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}
        if total
        else None,
        metadata=params.get("metadata") or {},
        invoice=None,
        invoice_creation=None,
        customer_details=None,
        customer_email=None,
        shipping_cost=None,
        currency_conversion=None,
    )
    return obj


def billing_portal_session(now: int, params: dict, base_url: str, livemode: bool):
    obj = example("billing_portal.session")
    session_id = new_id("bps")
    obj.update(
        id=session_id,
        created=now,
        customer=params.get("customer"),
        flow=None,
        return_url=params.get("return_url"),
        livemode=livemode,
        url=f"{base_url}/hosted/portal/{session_id}",
    )
    return obj


def event(
    now: int,
    event_type: str,
    obj: dict,
    livemode: bool,
    api_version: str,
    previous_attributes: dict | None = None,
) -> dict[str, Any]:
    evt = example("event")
    data: dict[str, Any] = {"object": copy.deepcopy(obj)}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    evt.update(
        id=new_id("evt"),
        created=now,
        type=event_type,
        data=data,
        livemode=livemode,
        api_version=api_version,
        pending_webhooks=1,
    )
    return evt


def setup_intent(now: int, customer_id: str, pm_id: str, livemode: bool) -> dict[str, Any]:
    obj = example("setup_intent")
    intent_id = new_id("seti")
    obj.update(
        id=intent_id,
        client_secret=f"{intent_id}_secret_{secrets.token_hex(12)}",
        created=now,
        customer=customer_id,
        payment_method=pm_id,
        status="succeeded",
        last_setup_error=None,
        next_action=None,
        livemode=livemode,
        payment_method_configuration_details=None,
    )
    return obj


def expiring_card(customer_id: str, pm: dict[str, Any]) -> dict[str, Any]:
    """The card object of `customer.source.expiring`, from the customer's card."""
    obj = example("card")
    details = pm["card"]
    obj.update(
        id=new_id("card"),
        customer=customer_id,
        brand=details["brand"].title(),
        last4=details["last4"],
        exp_month=details["exp_month"],
        exp_year=details["exp_year"],
        fingerprint=details["fingerprint"],
    )
    return obj
