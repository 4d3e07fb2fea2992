"""The only module that talks to Stripe.

It owns the client (API key, pinned version, optional Stripe-compatible base
address), puts an explicit idempotency key on every call that has an effect,
and turns the SDK's exceptions into this small tree:

    StripeFailure
    ├── StripeUnavailable        network error, 5xx: try again later
    │   └── StripeRateLimited    429
    ├── CardDeclined             402: the card said no (codes attached)
    └── StripeRequestRejected    4xx we caused: do not retry as is
        ├── StripeNotFound       404 resource_missing
        └── IdempotencyConflict  same key, other parameters

Every function returns plain dicts, so no SDK object leaks into the flow code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote

import orjson
import stripe

from recovery.config import Settings, get_settings

REQUEST_TIMEOUT_SECONDS = 20


class StripeFailure(Exception):
    def __init__(self, message: str, *, http_status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.code = code


class StripeUnavailable(StripeFailure):
    pass


class StripeRateLimited(StripeUnavailable):
    pass


class StripeRequestRejected(StripeFailure):
    pass


class StripeNotFound(StripeRequestRejected):
    pass


class IdempotencyConflict(StripeRequestRejected):
    pass


@dataclass
class Decline:
    """The codes Stripe attaches to a card error."""

    code: str | None
    decline_code: str | None
    advice_code: str | None
    network_advice_code: str | None
    network_decline_code: str | None
    charge_id: str | None
    payment_intent_id: str | None


class CardDeclined(StripeFailure):
    def __init__(self, message: str, decline: Decline):
        super().__init__(message, http_status=402, code=decline.code)
        self.decline = decline


def _decline_from(error: stripe.CardError) -> Decline:
    body = error.json_body.get("error", {}) if isinstance(error.json_body, dict) else {}
    intent = body.get("payment_intent")
    return Decline(
        code=body.get("code"),
        decline_code=body.get("decline_code"),
        advice_code=body.get("advice_code"),
        network_advice_code=body.get("network_advice_code"),
        network_decline_code=body.get("network_decline_code"),
        charge_id=body.get("charge"),
        payment_intent_id=intent.get("id") if isinstance(intent, dict) else intent,
    )


def _mapped(error: stripe.StripeError) -> StripeFailure:
    # Stripe's messages name objects and codes, never the cardholder; keep
    # them, but never the request body.
    message = getattr(error, "user_message", None) or error._message or type(error).__name__
    status, code = error.http_status, error.code
    if isinstance(error, stripe.CardError):
        return CardDeclined(message, _decline_from(error))
    if isinstance(error, stripe.RateLimitError):
        return StripeRateLimited(message, http_status=status, code=code)
    if isinstance(error, stripe.APIConnectionError) or (status or 0) >= 500:
        return StripeUnavailable(message, http_status=status, code=code)
    if isinstance(error, stripe.IdempotencyError):
        return IdempotencyConflict(message, http_status=status, code=code)
    if status == 404 or code == "resource_missing":
        return StripeNotFound(message, http_status=status, code=code)
    return StripeRequestRejected(message, http_status=status, code=code)


def make_client(settings: Settings) -> stripe.StripeClient:
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_api_key,
        stripe_version=settings.stripe_api_version,
        base_addresses=base,
        # We retry at our level with our own idempotency keys and backoff.
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=REQUEST_TIMEOUT_SECONDS),
    )


@lru_cache(maxsize=1)
def client() -> stripe.StripeClient:
    return make_client(get_settings())


def _request(
    method: str, path: str, params: dict[str, Any] | None = None, key: str | None = None
) -> dict[str, Any]:
    """One API request through the SDK's requestor (auth, version, encoding,
    typed errors), answered as plain JSON: building StripeObjects and turning
    them back into dicts cost more CPU than the request itself."""
    options = {"idempotency_key": key} if key else {}
    try:
        answer = client().raw_request(method, path, **(params or {}), **options)
    except stripe.StripeError as exc:
        raise _mapped(exc) from exc
    return orjson.loads(answer.body)


def _effect(key: str) -> str:
    if not key:
        raise ValueError("an idempotency key is required for a call with an effect")
    return key


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(part, safe="") for part in parts)


def retrieve_invoice(invoice_id: str) -> dict[str, Any]:
    return _request("get", _path("invoices", invoice_id))


def retrieve_invoice_and_card(invoice_id: str) -> dict[str, Any]:
    """The invoice with the cards Stripe would charge expanded, in one request:
    the invoice's own default, else its customer's."""
    return _request(
        "get",
        _path("invoices", invoice_id),
        {"expand": ["default_payment_method", "customer.invoice_settings.default_payment_method"]},
    )


def list_invoices(**params: Any) -> dict[str, Any]:
    return _request("get", _path("invoices"), params)


def pay_invoice(invoice_id: str, idempotency_key: str, **params: Any) -> dict[str, Any]:
    """Attempt payment now; CardDeclined carries the decline codes."""
    return _request(
        "post",
        _path("invoices", invoice_id, "pay"),
        {"off_session": True, **params},
        _effect(idempotency_key),
    )


def mark_uncollectible(invoice_id: str, idempotency_key: str) -> dict[str, Any]:
    return _request(
        "post", _path("invoices", invoice_id, "mark_uncollectible"), None, _effect(idempotency_key)
    )


def list_invoice_payments(invoice_id: str) -> dict[str, Any]:
    return _request("get", _path("invoice_payments"), {"invoice": invoice_id})


def retrieve_charge(charge_id: str) -> dict[str, Any]:
    return _request("get", _path("charges", charge_id))


def retrieve_payment_intent(payment_intent_id: str) -> dict[str, Any]:
    return _request(
        "get",
        _path("payment_intents", payment_intent_id),
        {"expand": ["latest_charge", "payment_method"]},
    )


def retrieve_customer(customer_id: str) -> dict[str, Any]:
    return _request("get", _path("customers", customer_id))


def retrieve_payment_method(payment_method_id: str) -> dict[str, Any]:
    return _request("get", _path("payment_methods", payment_method_id))


def retrieve_subscription(subscription_id: str) -> dict[str, Any]:
    return _request("get", _path("subscriptions", subscription_id))


def update_subscription(subscription_id: str, idempotency_key: str, **params: Any):
    return _request(
        "post", _path("subscriptions", subscription_id), params, _effect(idempotency_key)
    )


def cancel_subscription(subscription_id: str, idempotency_key: str) -> dict[str, Any]:
    return _request(
        "delete", _path("subscriptions", subscription_id), None, _effect(idempotency_key)
    )


def create_setup_checkout_session(
    customer_id: str,
    success_url: str,
    cancel_url: str,
    idempotency_key: str,
    currency: str | None = None,
) -> dict[str, Any]:
    """A Stripe-hosted page where the customer saves a new card."""
    params = {
        "mode": "setup",
        "customer": customer_id,
        "payment_method_types": ["card"],
        "success_url": success_url,
        "cancel_url": cancel_url,
    }
    if currency:
        params["currency"] = currency
    return _request("post", _path("checkout", "sessions"), params, _effect(idempotency_key))


def create_billing_portal_session(
    customer_id: str, return_url: str, idempotency_key: str
) -> dict[str, Any]:
    return _request(
        "post",
        _path("billing_portal", "sessions"),
        {"customer": customer_id, "return_url": return_url},
        _effect(idempotency_key),
    )


def list_events(**params: Any) -> dict[str, Any]:
    return _request("get", _path("events"), params)


def retrieve_setup_intent(setup_intent_id: str) -> dict[str, Any]:
    return _request("get", _path("setup_intents", setup_intent_id))


def set_default_payment_method(
    customer_id: str, payment_method_id: str, idempotency_key: str
) -> dict[str, Any]:
    """Make the card the one invoices are charged to from now on."""
    return _request(
        "post",
        _path("customers", customer_id),
        {"invoice_settings": {"default_payment_method": payment_method_id}},
        _effect(idempotency_key),
    )
