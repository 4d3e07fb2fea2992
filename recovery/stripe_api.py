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

Every function returns plain dicts, so no SDK object leaks into the flow code;
the readers at the end (the decline, the card Stripe will charge) are the one
place that knows where Stripe keeps those in its objects. Every write waits
for the write budget that all workers share (ratelimit.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import requests
import stripe
import structlog

from recovery import clock, ratelimit
from recovery.config import Settings, get_settings
from recovery.metrics import STRIPE_REQUESTS

log = structlog.get_logger("recovery.stripe")

REQUEST_TIMEOUT_SECONDS = 20
# Stripe's answers to a revoked or rolled key (401), or a restricted key
# stripped of a permission (403).
KEY_REFUSED = (401, 403)


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


def request_timeout(settings: Settings) -> float:
    """At most 20 s, and under half a step's lease: a call with an idempotency
    key has always ended before another worker may claim the step and send the
    same key again."""
    return min(REQUEST_TIMEOUT_SECONDS, settings.step_lease_seconds / 2)


def _session(settings: Settings) -> requests.Session:
    """requests' session; for a Stripe-compatible server on this machine it
    skips reading proxy settings from the environment on every request
    (a tenth of the demo's time in requests): a loopback address is never
    reached through a proxy. Stripe itself keeps HTTPS_PROXY and friends."""
    session = requests.Session()
    host = urlsplit(settings.stripe_api_base or "").hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        session.trust_env = False
    return session


def make_client(settings: Settings) -> stripe.StripeClient:
    return stripe.StripeClient(
        settings.stripe_api_key,
        stripe_version=settings.stripe_api_version,
        # A Stripe-compatible server instead of Stripe, when configured.
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else {},
        # We retry at our level with our own idempotency keys and backoff.
        max_network_retries=0,
        http_client=stripe.RequestsClient(
            timeout=request_timeout(settings), session=_session(settings)
        ),
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
    if method == "get":
        ratelimit.acquire(ratelimit.read_bucket())
    try:
        answer = client().raw_request(method, path, **(params or {}), **options)
    except stripe.StripeError as exc:
        status = exc.http_status
        STRIPE_REQUESTS.labels(method, str(status) if status else "network").inc()
        if status in KEY_REFUSED:
            # Nothing works until an operator sets a new key: tell them.
            from recovery.business import alerts

            try:
                alerts.stripe_key_refused(status, clock.now(), get_settings())
            except Exception:  # noqa: BLE001 - the alert must not hide Stripe's answer
                log.exception("alert_not_recorded", alert="stripe_key")
        raise _mapped(exc) from exc
    STRIPE_REQUESTS.labels(method, str(answer.code)).inc()
    return orjson.loads(answer.body)


def key_works() -> bool:
    """Whether Stripe accepts the configured key now (a cheap read)."""
    try:
        _request("get", "/v1/events", {"limit": 1})
    except StripeFailure as failure:
        return failure.http_status not in KEY_REFUSED
    return True


def _effect(key: str) -> str:
    """The key of a write, once the shared write budget lets it go."""
    if not key:
        raise ValueError("an idempotency key is required for a call with an effect")
    ratelimit.acquire()
    return key


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(part, safe="") for part in parts)


def retrieve_invoice(invoice_id: str) -> dict[str, Any]:
    return _request("get", _path("invoices", invoice_id))


# Everything a decision needs about an invoice now, in one request: its
# subscription (is it still alive?) and every card Stripe might charge.
_INVOICE_STATE = [
    "default_payment_method",
    "parent.subscription_details.subscription.default_payment_method",
    "customer.invoice_settings.default_payment_method",
    "customer.default_source",
]


def retrieve_invoice_state(invoice_id: str) -> dict[str, Any]:
    """The invoice as Stripe has it now, with its subscription and the cards it
    would be charged to expanded (see card_to_charge, subscription_canceled)."""
    return _request("get", _path("invoices", invoice_id), {"expand": _INVOICE_STATE})


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
    """The invoice's payments, each with its PaymentIntent and that intent's
    latest charge expanded: a decline's facts in one read, not three."""
    return _request(
        "get",
        _path("invoice_payments"),
        {"invoice": invoice_id, "expand": ["data.payment.payment_intent.latest_charge"]},
    )


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


def list_cards(customer_id: str) -> list[Card]:
    """The cards saved on a customer (the first hundred, newest first)."""
    found = _request(
        "get", _path("customers", customer_id, "payment_methods"), {"type": "card", "limit": 100}
    )
    return [card for card in (card_of(pm) for pm in found.get("data") or []) if card is not None]


def retrieve_subscription(subscription_id: str) -> dict[str, Any]:
    return _request("get", _path("subscriptions", subscription_id))


def update_subscription(
    subscription_id: str, idempotency_key: str, **params: Any
) -> dict[str, Any]:
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


# -- reading Stripe's objects ----------------------------------------------------


def id_of(value: Any) -> str | None:
    """An expandable field: either an id or the object carrying it."""
    if isinstance(value, dict):
        found = value.get("id")
        return found if isinstance(found, str) else None
    return value if isinstance(value, str) else None


def subscription_of(invoice: dict[str, Any]) -> str | None:
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return id_of(details.get("subscription")) or id_of(invoice.get("subscription"))


@dataclass(frozen=True)
class DeclineDetails:
    """Why an invoice's latest payment failed, as the network and Stripe said,
    and on which card: the case's columns of the same names."""

    charge_id: str | None = None
    payment_intent_id: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    advice_code: str | None = None
    network_advice_code: str | None = None
    network_decline_code: str | None = None
    outcome_type: str | None = None
    payment_method_id: str | None = None
    payment_method_type: str | None = None
    card_brand: str | None = None
    card_fingerprint: str | None = None
    card_last4: str | None = None
    card_exp_month: int | None = None
    card_exp_year: int | None = None

    def known(self) -> dict[str, Any]:
        """The details Stripe gave, leaving out what it did not."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def _latest_payment(
    invoice: dict[str, Any], at: datetime | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(charge, payment_intent) of the invoice's latest attempt at `at` (the
    failure's moment; None: the latest of all), fetched if needed."""
    charge = invoice.get("charge")
    intent = invoice.get("payment_intent")
    if isinstance(charge, str):
        charge = retrieve_charge(charge)
    if isinstance(intent, str):
        intent = retrieve_payment_intent(intent)
    if charge is None and intent is None:
        # Since API version 2025-03-31 invoices name their payments only
        # through InvoicePayment objects.
        payments = list_invoice_payments(invoice["id"]).get("data", [])
        if at is not None:
            # A late event speaks of its own attempt, not of those after it.
            payments = [p for p in payments if (p.get("created") or 0) <= at.timestamp()]
        if payments:
            payment = max(payments, key=lambda p: p.get("created") or 0).get("payment") or {}
            intent, charge = payment.get("payment_intent"), payment.get("charge")
            # Expanded by the listing; ids only if Stripe did not expand them.
            if isinstance(intent, str):
                intent = retrieve_payment_intent(intent)
            elif intent is None and isinstance(charge, str):
                charge = retrieve_charge(charge)
    if charge is None and isinstance(intent, dict):
        latest = intent.get("latest_charge")
        charge = (
            latest
            if isinstance(latest, dict)
            else (retrieve_charge(latest) if isinstance(latest, str) else None)
        )
    return (
        charge if isinstance(charge, dict) else None,
        intent if isinstance(intent, dict) else None,
    )


def decline_details(invoice: dict[str, Any], at: datetime | None = None) -> DeclineDetails:
    """The decline of the invoice's payment attempt at `at` (else its latest),
    from its charge or payment intent (fetched when the event carries only
    their ids)."""
    charge, intent = _latest_payment(invoice, at)
    error = (intent or {}).get("last_payment_error") or {}
    outcome = (charge or {}).get("outcome") or {}
    method_details = (charge or {}).get("payment_method_details") or {}
    pm = error.get("payment_method") if isinstance(error.get("payment_method"), dict) else None
    if pm is None and isinstance((intent or {}).get("payment_method"), dict):
        pm = (intent or {})["payment_method"]
    card = method_details.get("card") or (pm or {}).get("card") or {}
    return DeclineDetails(
        charge_id=id_of(charge) or error.get("charge"),
        payment_intent_id=id_of(intent),
        failure_code=(charge or {}).get("failure_code") or error.get("code"),
        decline_code=error.get("decline_code") or outcome.get("reason"),
        advice_code=outcome.get("advice_code") or error.get("advice_code"),
        network_advice_code=outcome.get("network_advice_code") or error.get("network_advice_code"),
        network_decline_code=outcome.get("network_decline_code")
        or error.get("network_decline_code"),
        outcome_type=outcome.get("type"),
        payment_method_id=id_of((charge or {}).get("payment_method")) or id_of(pm),
        payment_method_type=method_details.get("type")
        or (pm or {}).get("type")
        or ("card" if card else None),
        card_brand=card.get("brand"),
        card_fingerprint=card.get("fingerprint"),
        card_last4=card.get("last4"),
        card_exp_month=card.get("exp_month"),
        card_exp_year=card.get("exp_year"),
    )


@dataclass(frozen=True)
class Card:
    """A card as the engine needs it: which one, and its network's facts."""

    payment_method_id: str | None
    fingerprint: str | None
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None


def subscription_of_state(invoice: dict[str, Any]) -> dict[str, Any] | None:
    """The invoice's subscription object, as retrieve_invoice_state expands it."""
    parent = invoice.get("parent") or {}
    found = (parent.get("subscription_details") or {}).get("subscription")
    if not isinstance(found, dict):
        found = invoice.get("subscription")
    return found if isinstance(found, dict) else None


def subscription_canceled(invoice: dict[str, Any]) -> bool:
    """Whether the invoice's subscription has ended at Stripe."""
    subscription = subscription_of_state(invoice)
    return subscription is not None and subscription.get("status") in ("canceled",)


def card_to_charge(invoice: dict[str, Any]) -> Card | None:
    """The card Stripe will charge for the invoice, in Stripe's order: the
    invoice's default payment method, else its subscription's, else the
    customer's invoice default, else the customer's default source.
    Expanded by retrieve_invoice_state; fetched here only if it was not."""
    subscription = subscription_of_state(invoice) or {}
    customer = invoice.get("customer")
    pm: Any = invoice.get("default_payment_method") or subscription.get("default_payment_method")
    if not pm and isinstance(customer, str):
        customer = retrieve_customer(customer)
    if not pm and isinstance(customer, dict):
        pm = (customer.get("invoice_settings") or {}).get("default_payment_method") or customer.get(
            "default_source"
        )
    if isinstance(pm, str):
        pm = retrieve_payment_method(pm)
    return card_of(pm)


def card_of(pm: Any) -> Card | None:
    """A payment method object (or a legacy card source) as a Card."""
    if not isinstance(pm, dict):
        return None
    card = pm.get("card") if pm.get("object") != "card" else pm
    card = card or {}
    return Card(
        payment_method_id=pm.get("id"),
        fingerprint=card.get("fingerprint"),
        brand=card.get("brand"),
        last4=card.get("last4"),
        exp_month=card.get("exp_month"),
        exp_year=card.get("exp_year"),
    )
