"""A Stripe-compatible HTTP server for tests, the demo and trying the product.

It speaks Stripe's wire format to the real `stripe` SDK: form-encoded
requests, Bearer keys, JSON objects shaped from Stripe's examples, error bodies
(402 card_error with decline codes, 404 resource_missing, 429, 500), and
Idempotency-Key replay/mismatch. It signs and delivers webhook events.

Routes under /_sim/ (JSON in, JSON out) steer it: create customers, cards and
invoices, say how a card behaves, inject faults, move its clock. A driver in
the same process (the demo, tests) hands it a clock instead, and its time
follows the driver's simulated one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import parse_qs, parse_qsl

from recovery.config import DEFAULT_STRIPE_API_VERSION
from recovery.inbox.receiver import signature_header
from recovery.sim import hosted, objects


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(body.get("message"))
        self.status = status
        self.body = body


_RATE_LIMITED = {
    "error": {
        "type": "invalid_request_error",
        "code": "rate_limit",
        "message": "Too many requests hit the API too quickly.",
    }
}


def _not_found(kind: str, object_id: str, param: str = "id") -> ApiError:
    return ApiError(
        404,
        {
            "type": "invalid_request_error",
            "code": "resource_missing",
            "message": f"No such {kind}: '{object_id}'",
            "param": param,
        },
    )


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, {"type": "invalid_request_error", "message": message, "param": param})


_KEY = re.compile(r"([^\[\]]+)|\[([^\]]*)\]")


def decode_form(raw: str) -> dict[str, Any]:
    """Stripe's bracket encoding (`a[b][0]=x`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        parts = [a or b for a, b in _KEY.findall(key)]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def listify(node):
        if isinstance(node, dict):
            node = {k: listify(v) for k, v in node.items()}
            if node and all(k.isdigit() for k in node):
                return [node[k] for k in sorted(node, key=int)]
        return node

    return listify(root)


@dataclass
class CardBehavior:
    """How the simulated issuer answers a charge on one card."""

    mode: str = "succeed"  # succeed | decline | authenticate
    decline_code: str | None = None
    failure_code: str = "card_declined"
    advice_code: str | None = None
    network_advice_code: str | None = None
    network_decline_code: str | None = None
    outcome_type: str = "issuer_declined"
    succeed_after: int | None = None  # sim-clock time from which the card is good
    # From succeed_after (or at once), each attempt is approved with this
    # chance; the tosses are named by `draws` and the attempt's number.
    approve_chance: float | None = None
    draws: str = ""
    # Sim-clock [start, end) spans in which the card is good, and only then.
    funded: list[list[int]] | None = None
    attempts: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CardBehavior:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "attempts"}
        if known.get("mode", "succeed") not in ("succeed", "decline", "authenticate"):
            raise _invalid("mode must be succeed, decline or authenticate", "mode")
        chance = known.get("approve_chance")
        if chance is not None and not (
            isinstance(chance, int | float) and not isinstance(chance, bool) and 0 <= chance <= 1
        ):
            raise _invalid("approve_chance must be a number from 0 to 1", "approve_chance")
        spans = known.get("funded")
        if spans is not None and not (
            isinstance(spans, list)
            and all(
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                for span in spans
            )
        ):
            raise _invalid("funded must be a list of [start, end] times", "funded")
        return cls(**known)

    def approves(self, now: int) -> bool:
        """Whether the issuer approves an off-session charge at `now`; each
        call is one attempt."""
        self.attempts += 1
        if self.mode == "succeed":
            return True
        if self.funded is not None:
            return any(start <= now < end for start, end in self.funded)
        if self.succeed_after is not None and now < self.succeed_after:
            return False
        if self.approve_chance is not None:
            toss = hashlib.sha256(f"{self.draws}:{self.attempts}".encode()).digest()
            return int.from_bytes(toss[:8]) / 2**64 < self.approve_chance
        return self.succeed_after is not None


@dataclass
class Fault:
    path_prefix: str
    status: int | None  # None: a timeout (the answer is held back `delay` seconds)
    count: int
    delay: float = 0.0
    # "before": fail without acting; "after": act, then lose the answer (the
    # caller sees a timeout although the charge happened); "slow": wait
    # `delay` seconds, then act and answer as usual; "late": act, then answer
    # as usual `delay` seconds later (its webhooks go out meanwhile).
    when: str = "before"


@dataclass
class State:
    api_key_prefix: str = "sk_"
    livemode: bool = False
    base_url: str = "http://127.0.0.1:12111"
    clock_offset: float = 0.0
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    behaviors: dict[str, CardBehavior] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    idempotency: dict[tuple[str, str], tuple[str, int, bytes]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    endpoints: list[tuple[str, str]] = field(default_factory=list)
    requests_seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    # Every charge attempt made through the API: (invoice id, charge id, key).
    charges: list[tuple[str, str, str | None]] = field(default_factory=list)
    # Stripe's write rate limit, when set: more POSTs per second get 429.
    write_rate: float | None = None
    write_tokens: float = 0.0
    write_checked: float = 0.0
    # Every API write as (monotonic time, status): what a rate benchmark reads.
    writes: list[tuple[float, int]] = field(default_factory=list)
    # Payment-mode Checkout Sessions whose card is saved on their customer
    # (payment_intent_data[setup_future_usage]; not on Stripe's object).
    saves_card: set[str] = field(default_factory=set)
    # API keys rolled or revoked on the Dashboard: Stripe answers them 401.
    revoked_keys: set[str] = field(default_factory=set)


class StripeSim:
    """The simulator's state and its WSGI entry point (`sim.wsgi`)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:12111",
        livemode: bool = False,
        clock: Callable[[], datetime] | None = None,
    ):
        self.state = State(base_url=base_url.rstrip("/"), livemode=livemode)
        # The time it runs at: the driver's clock when given, else the real one;
        # /_sim/clock moves it further by an offset.
        self._clock = clock
        self.lock = threading.RLock()
        self._current_key: str | None = None  # of the request being answered
        self._outbox: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._deliveries: list[dict[str, Any]] = []
        threading.Thread(target=self._deliver_forever, daemon=True, name="sim-webhooks").start()

    # -- time and storage -------------------------------------------------

    def now(self) -> int:
        base = self._clock().timestamp() if self._clock is not None else time.time()
        return int(base + self.state.clock_offset)

    def get(self, kind: str, object_id: str, param: str = "id") -> dict[str, Any]:
        """The stored object, or Stripe's 404 naming `param` (the URL's id, or
        the request parameter that named a missing object)."""
        obj = self.state.objects.get(object_id)
        if obj is None or obj.get("object") != kind:
            raise _not_found(kind, object_id, param)
        return obj

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.state.objects[obj["id"]] = obj
        return obj

    # -- webhooks -----------------------------------------------------------

    def emit(self, event_type: str, obj: dict, previous: dict | None = None) -> dict[str, Any]:
        evt = objects.event(
            self.now(), event_type, obj, self.state.livemode, DEFAULT_STRIPE_API_VERSION, previous
        )
        self.state.events.append(evt)
        payload = json.dumps(evt).encode()
        for url, secret in self.state.endpoints:
            self._outbox.put((url, secret, payload))
        return evt

    def _deliver_forever(self) -> None:
        while True:
            url, secret, payload = self._outbox.get()
            try:
                self._deliver(url, secret, payload)
            finally:
                self._outbox.task_done()

    def _deliver(self, url: str, secret: str, payload: bytes) -> None:
        status: int | str = "unsent"
        for attempt in range(5):
            # Signed with the real clock: the receiver checks it against its own.
            header = signature_header(payload, secret, int(time.time()))
            request = urllib.request.Request(
                url,
                data=payload,
                method="POST",
                headers={"Content-Type": "application/json", "Stripe-Signature": header},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                status = type(exc).__name__
            if status == 200:
                break
            time.sleep(0.2 * (attempt + 1))
        with self.lock:
            self._deliveries.append({"url": url, "status": status})

    def flush(self) -> list[dict[str, Any]]:
        """Wait until every emitted event has been delivered (or given up on)."""
        self._outbox.join()
        with self.lock:
            return list(self._deliveries)

    # -- payments -----------------------------------------------------------

    def default_payment_method(self, invoice: dict) -> dict[str, Any]:
        """The card Stripe charges for an invoice: the invoice's default, else
        its subscription's, else the customer's invoice default."""
        customer = self.get("customer", invoice["customer"])
        subscription = self.state.objects.get(invoice.get("subscription") or "") or {}
        pm_id = (
            invoice.get("default_payment_method")
            or subscription.get("default_payment_method")
            or customer["invoice_settings"].get("default_payment_method")
        )
        if not pm_id:
            raise _invalid("The customer has no default payment method", "payment_method")
        return self.get("payment_method", pm_id)

    def attempt_payment(
        self, invoice: dict, pm: dict, on_session: bool = False
    ) -> tuple[dict, dict, dict | None]:
        """Charge `pm` for `invoice`; returns (payment_intent, charge, card error or None).
        On session (the customer on the hosted page) an authentication succeeds."""
        now = self.now()
        intent, chg, error = self._charge(
            invoice["amount_due"], invoice["currency"], invoice["customer"], pm, on_session
        )
        invoice["attempt_count"] += 1
        invoice["attempted"] = True
        if error is None:
            _mark_paid(invoice, now)
        self.put(
            objects.invoice_payment(
                now, invoice, intent, "paid" if error is None else "open", self.state.livemode
            )
        )
        if error is None:
            self.emit("invoice.paid", invoice)
            self.emit("invoice.payment_succeeded", invoice)
        else:
            if intent["status"] == "requires_action":
                self.emit("invoice.payment_action_required", invoice)
            self.emit("invoice.payment_failed", invoice)
        return intent, chg, error

    def _charge(
        self, amount: int, currency: str, customer_id: str | None, pm: dict, on_session: bool
    ) -> tuple[dict, dict, dict | None]:
        """One PaymentIntent and its charge for `pm`, answered as the card's
        behaviour says; both stored. Returns (intent, charge, card error or None)."""
        now = self.now()
        behavior = self.state.behaviors.get(pm["id"], CardBehavior())
        if on_session and behavior.mode == "authenticate":
            behavior = CardBehavior()
        intent = objects.payment_intent(now, amount, currency, customer_id, pm, self.state.livemode)
        chg = objects.charge(now, intent, pm, self.state.livemode)
        intent["latest_charge"] = chg["id"]
        error = None
        if behavior.approves(now):
            chg.update(
                status="succeeded",
                paid=True,
                captured=True,
                amount_captured=chg["amount"],
                failure_code=None,
                failure_message=None,
            )
            chg["outcome"].update(
                type="authorized",
                network_status="approved_by_network",
                reason=None,
                seller_message="Payment complete.",
                risk_level="normal",
            )
            intent.update(status="succeeded", amount_received=intent["amount"])
        else:
            code = (
                "authentication_required"
                if behavior.mode == "authenticate"
                else (behavior.failure_code)
            )
            decline = (
                "authentication_required"
                if behavior.mode == "authenticate"
                else (behavior.decline_code or "generic_decline")
            )
            message = (
                "Your card was declined. This transaction requires authentication."
                if behavior.mode == "authenticate"
                else "Your card was declined."
            )
            outcome_type = (
                "issuer_declined" if behavior.mode == "authenticate" else (behavior.outcome_type)
            )
            chg.update(
                status="failed",
                paid=False,
                captured=False,
                failure_code=code,
                failure_message=message,
            )
            chg["outcome"].update(
                type=outcome_type,
                reason=decline,
                advice_code=behavior.advice_code,
                network_advice_code=behavior.network_advice_code,
                network_decline_code=behavior.network_decline_code,
                network_status="declined_by_network"
                if outcome_type == "issuer_declined"
                else "not_sent_to_network",
                seller_message="The bank did not return any further details with this decline.",
            )
            error = {
                "type": "card_error",
                "code": code,
                "decline_code": decline,
                "message": message,
                "charge": chg["id"],
                "doc_url": f"https://stripe.com/docs/error-codes/{code}",
                "advice_code": behavior.advice_code,
                "network_advice_code": behavior.network_advice_code,
                "network_decline_code": behavior.network_decline_code,
                "payment_method": copy.deepcopy(pm),
            }
            status = (
                "requires_action"
                if behavior.mode == "authenticate"
                else ("requires_payment_method")
            )
            intent.update(
                status=status,
                last_payment_error={k: v for k, v in error.items() if k != "charge"}
                | {"charge": chg["id"]},
            )
            if behavior.mode == "authenticate":
                intent["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {}}
            error["payment_intent"] = copy.deepcopy(intent)
        self.put(intent)
        self.put(chg)
        return intent, chg, error

    # -- the Stripe API -------------------------------------------------------

    def _expand(self, obj: dict, expand: list[str]) -> dict:
        """Stripe's `expand`: ids become objects, along dotted paths
        ("customer.invoice_settings.default_payment_method"), through every
        item of a list ("data.payment.payment_intent" on a list), at most
        four levels deep."""
        obj = copy.deepcopy(obj)
        for path in expand:
            names = path.split(".")
            if len(names) > 4:
                raise _invalid(
                    f"You cannot expand more than 4 levels of a property. Property: {path}",
                    "expand",
                )
            self._expand_along(obj, names)
        return obj

    def _expand_along(self, node: Any, names: list[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self._expand_along(item, names)
            return
        if not names or not isinstance(node, dict):
            return
        value = node.get(names[0])
        if isinstance(value, str) and value in self.state.objects:
            value = node[names[0]] = copy.deepcopy(self.state.objects[value])
        self._expand_along(value, names[1:])

    def _list_events(self, params: dict, since: int) -> dict[str, Any]:
        kind = params.get("type")
        events = [
            e for e in self.state.events if kind in (None, e["type"]) and e["created"] >= since
        ]
        # Newest first, like Stripe; equal times keep the order they happened in, reversed.
        events = list(reversed(sorted(events, key=lambda e: e["created"])))
        if params.get("starting_after"):
            ids = [e["id"] for e in events]
            if params["starting_after"] in ids:
                events = events[ids.index(params["starting_after"]) + 1 :]
        limit = int(params.get("limit") or 10)
        if not 1 <= limit <= 100:
            raise _invalid("limit must be between 1 and 100", "limit")
        return {
            "object": "list",
            "data": events[:limit],
            "has_more": len(events) > limit,
            "url": "/v1/events",
        }

    def _list(self, kind: str, params: dict, url: str, match) -> dict[str, Any]:
        items = [o for o in self.state.objects.values() if o.get("object") == kind and match(o)]
        # Newest first, like Stripe, creation order breaking ties within a second.
        items = list(reversed(sorted(items, key=lambda o: o.get("created", 0))))
        if params.get("starting_after"):
            ids = [o["id"] for o in items]
            if params["starting_after"] in ids:
                items = items[ids.index(params["starting_after"]) + 1 :]
        limit = int(params.get("limit") or 10)
        if not 1 <= limit <= 100:
            raise _invalid("limit must be between 1 and 100", "limit")
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit, "url": url}

    def api(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")[1:]  # drop "v1"
        expand = params.get("expand") or []
        route = (method, parts[0] if parts else "", len(parts))
        match route:
            case ("GET", "invoices", 2):
                return 200, self._expand(self.get("invoice", parts[1]), expand)
            case ("GET", "invoices", 1):
                return 200, self._list(
                    "invoice",
                    params,
                    "/v1/invoices",
                    lambda o: all(
                        params.get(k) in (None, o.get(k))
                        for k in ("customer", "status", "subscription")
                    ),
                )
            case ("POST", "invoices", 3) if parts[2] == "pay":
                return self._pay_invoice(parts[1], params)
            case ("POST", "invoices", 3) if parts[2] == "mark_uncollectible":
                invoice = self.get("invoice", parts[1])
                if invoice["status"] != "open":
                    raise _invalid(f"You cannot mark an invoice {invoice['status']} uncollectible")
                invoice["status"] = "uncollectible"
                self.emit("invoice.marked_uncollectible", invoice)
                return 200, invoice
            case ("GET", "invoice_payments", 1):
                listed = self._list(
                    "invoice_payment",
                    params,
                    "/v1/invoice_payments",
                    lambda o: params.get("invoice") in (None, o["invoice"]),
                )
                return 200, self._expand(listed, expand)
            case ("GET", "charges", 2):
                return 200, self._expand(self.get("charge", parts[1]), expand)
            case ("GET", "payment_intents", 2):
                return 200, self._expand(self.get("payment_intent", parts[1]), expand)
            case ("GET", "customers", 2):
                return 200, self._expand(self.get("customer", parts[1]), expand)
            case ("GET", "setup_intents", 2):
                return 200, self.get("setup_intent", parts[1])
            case ("POST", "customers", 2):
                return 200, self._update_customer(parts[1], params)
            case ("GET", "payment_methods", 2):
                return 200, self.get("payment_method", parts[1])
            case ("GET", "customers", 3) if parts[2] == "payment_methods":
                customer_id = self.get("customer", parts[1])["id"]
                kind = params.get("type")
                return 200, self._list(
                    "payment_method",
                    params,
                    f"/v1/customers/{customer_id}/payment_methods",
                    lambda o: o.get("customer") == customer_id and kind in (None, o["type"]),
                )
            case ("GET", "subscriptions", 2):
                return 200, self._expand(self.get("subscription", parts[1]), expand)
            case ("POST", "subscriptions", 2):
                return 200, self._update_subscription(parts[1], params)
            case ("DELETE", "subscriptions", 2):
                return 200, self._cancel_subscription(parts[1])
            case ("POST", "checkout", 2) if parts[1] == "sessions":
                return 200, self._create_checkout_session(params)
            case ("GET", "checkout", 3) if parts[1] == "sessions":
                return 200, self.get("checkout.session", parts[2])
            case ("POST", "billing_portal", 2) if parts[1] == "sessions":
                self.get("customer", params.get("customer") or "")
                return 200, self.put(
                    objects.billing_portal_session(
                        self.now(), params, self.state.base_url, self.state.livemode
                    )
                )
            case ("GET", "events", 1):
                created = params.get("created") or {}
                since = int(created.get("gte", 0)) if isinstance(created, dict) else 0
                return 200, self._list_events(params, since)
            case ("GET", "events", 2):
                for evt in self.state.events:
                    if evt["id"] == parts[1]:
                        return 200, evt
                raise _not_found("event", parts[1])
        raise ApiError(
            404,
            {
                "type": "invalid_request_error",
                "message": f"Unrecognized request URL ({method}: {path}).",
            },
        )

    def _pay_invoice(self, invoice_id: str, params: dict) -> tuple[int, dict]:
        invoice = self.get("invoice", invoice_id)
        if invoice["status"] == "paid":
            raise _invalid("Invoice is already paid")
        if invoice["status"] != "open":
            raise _invalid(f"You cannot pay an invoice with status {invoice['status']}")
        if params.get("paid_out_of_band") in ("true", True):
            _mark_paid(invoice, self.now(), paid_out_of_band=True)
            self.emit("invoice.paid", invoice)
            return 200, invoice
        pm = (
            self.get("payment_method", params["payment_method"])
            if params.get("payment_method")
            else self.default_payment_method(invoice)
        )
        _intent, charge, error = self.attempt_payment(invoice, pm)
        self.state.charges.append((invoice_id, charge["id"], self._current_key))
        if error:
            return 402, {"error": error}
        return 200, invoice

    def _update_subscription(self, sub_id: str, params: dict) -> dict:
        sub = self.get("subscription", sub_id)
        previous = {}
        for key in ("metadata", "cancel_at_period_end", "default_payment_method"):
            if key in params:
                previous[key] = sub.get(key)
                value = params[key]
                sub[key] = value == "true" if key == "cancel_at_period_end" else value
        if params.get("pause_collection") == "":
            previous["pause_collection"] = sub.get("pause_collection")
            sub["pause_collection"] = None
        self.emit("customer.subscription.updated", sub, previous)
        return sub

    def _cancel_subscription(self, sub_id: str) -> dict:
        sub = self.get("subscription", sub_id)
        if sub["status"] == "canceled":
            raise _invalid("This subscription has already been canceled", None)
        now = self.now()
        sub.update(status="canceled", canceled_at=now, ended_at=now)
        self.emit("customer.subscription.deleted", sub)
        return sub

    # -- the control API --------------------------------------------------------

    def control(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[1:]  # drop "_sim"
        now = self.now()
        match (method, *parts):
            case ("POST", "webhook_endpoints"):
                self.state.endpoints.append((body["url"], body["secret"]))
                return 200, {"url": body["url"]}
            case ("POST", "customers"):
                return 200, self._create_customer(body)
            case ("POST", "customers", customer_id, "cards"):
                return 200, self._change_card(customer_id, body)
            case ("POST", "customers", customer_id, "card_expiring"):
                # Stripe's notice that the customer's card expires this month.
                customer = self.get("customer", customer_id)
                pm = self.get(
                    "payment_method", customer["invoice_settings"]["default_payment_method"]
                )
                return 200, self.emit(
                    "customer.source.expiring", objects.expiring_card(customer_id, pm)
                )
            case ("POST", "payment_methods", pm_id, "behavior"):
                self.get("payment_method", pm_id)
                self.state.behaviors[pm_id] = CardBehavior.from_json(body)
                return 200, {"payment_method": pm_id}
            case ("POST", "invoices"):
                customer = self.get("customer", body["customer"])
                sub_id = body.get("subscription")
                if sub_id == "auto":
                    sub_id = self.put(
                        objects.subscription(
                            now,
                            customer["id"],
                            int(body["amount"]),
                            body.get("currency", "usd"),
                            self.state.livemode,
                        )
                    )["id"]
                inv = self.put(
                    objects.invoice(
                        now,
                        customer,
                        sub_id,
                        int(body["amount"]),
                        body.get("currency", "usd"),
                        self.state.base_url,
                        self.state.livemode,
                    )
                )
                if body.get("next_payment_attempt"):
                    inv["next_payment_attempt"] = int(body["next_payment_attempt"])
                return 200, inv
            case ("POST", "invoices", invoice_id, "attempt"):
                invoice = self.get("invoice", invoice_id)
                _intent, chg, error = self.attempt_payment(
                    invoice, self.default_payment_method(invoice)
                )
                return 200, {"invoice": invoice, "charge": chg, "error": error}
            case ("POST", "invoices", invoice_id, "void"):
                invoice = self.get("invoice", invoice_id)
                invoice["status"] = "void"
                self.emit("invoice.voided", invoice)
                return 200, invoice
            case ("POST", "invoices", invoice_id, "mark_uncollectible"):
                invoice = self.get("invoice", invoice_id)
                invoice["status"] = "uncollectible"
                self.emit("invoice.marked_uncollectible", invoice)
                return 200, invoice
            case ("POST", "scenarios", "failed_invoice"):
                return 200, self._failed_invoice(body)
            case ("POST", "faults"):
                self.state.faults.append(
                    Fault(
                        body.get("path_prefix", "/v1/"),
                        None if body.get("status") in ("timeout", None) else int(body["status"]),
                        int(body.get("count", 1)),
                        float(body.get("delay", 0)),
                        body.get("when", "before"),
                    )
                )
                return 200, {"faults": len(self.state.faults)}
            case ("POST", "clock"):
                self.state.clock_offset += float(body.get("advance", 0))
                if "now" in body:
                    self.state.clock_offset += float(body["now"]) - self.now()
                return 200, {"now": self.now()}
            case ("GET", "events"):
                return 200, {"data": self.state.events}
            case ("GET", "charges"):
                return 200, {"data": self.state.charges}
            case ("POST", "rate_limit"):
                rate = body.get("writes_per_second")
                self.state.write_rate = float(rate) if rate else None
                self.state.write_tokens = self.state.write_rate or 0.0
                self.state.write_checked = time.monotonic()
                return 200, {"writes_per_second": self.state.write_rate}
            case ("GET", "writes"):
                return 200, {"data": self.state.writes}
            case ("GET", "requests"):
                return 200, {"data": self.state.requests_seen}
        raise _not_found("simulator route", path)

    def _create_customer(self, body: dict) -> dict:
        now = self.now()
        customer = self.put(
            objects.customer(now, body.get("email"), body.get("name"), self.state.livemode)
        )
        card = body.get("card")
        if card is not None:
            pm = self.put(objects.payment_method(now, customer["id"], card, self.state.livemode))
            self.state.behaviors[pm["id"]] = CardBehavior.from_json(card.get("behavior", {}))
            customer["invoice_settings"]["default_payment_method"] = pm["id"]
        # Cards saved earlier and still attached, none of them the default.
        for other in body.get("other_cards") or []:
            pm = self.put(objects.payment_method(now, customer["id"], other, self.state.livemode))
            self.state.behaviors[pm["id"]] = CardBehavior.from_json(other.get("behavior", {}))
        return customer

    def _change_card(self, customer_id: str, card: dict) -> dict:
        """The customer saves a new card: the events Stripe sends for it."""
        customer = self.get("customer", customer_id)
        pm = self.put(objects.payment_method(self.now(), customer_id, card, self.state.livemode))
        self.state.behaviors[pm["id"]] = CardBehavior.from_json(card.get("behavior", {}))
        previous = {"invoice_settings": dict(customer["invoice_settings"])}
        customer["invoice_settings"]["default_payment_method"] = pm["id"]
        self.emit("payment_method.attached", pm)
        self.emit("customer.updated", customer, previous)
        return pm

    def _update_customer(self, customer_id: str, params: dict) -> dict:
        customer = self.get("customer", customer_id)
        settings = params.get("invoice_settings") or {}
        if "default_payment_method" in settings:
            pm = self.get("payment_method", settings["default_payment_method"])
            if pm["customer"] != customer_id:
                raise _invalid("The payment method is not attached to this customer.")
            previous = {"invoice_settings": dict(customer["invoice_settings"])}
            customer["invoice_settings"]["default_payment_method"] = pm["id"]
            self.emit("customer.updated", customer, previous)
        return customer

    def _create_checkout_session(self, params: dict) -> dict:
        """Setup mode saves a card on a customer; payment mode charges its
        line items (`price_data` ones) once, for a customer or none."""
        mode = params.get("mode")
        if mode not in ("setup", "payment"):
            raise _invalid(
                "Invalid mode: this simulator's Checkout has payment and setup mode", "mode"
            )
        if mode == "setup" or params.get("customer"):
            self.get("customer", params.get("customer") or "", "customer")
        total = _line_items_total(params.get("line_items")) if mode == "payment" else None
        session = self.put(
            objects.checkout_session(
                self.now(), params, self.state.base_url, self.state.livemode, total
            )
        )
        future_usage = (params.get("payment_intent_data") or {}).get("setup_future_usage")
        if future_usage in ("on_session", "off_session"):
            self.state.saves_card.add(session["id"])
        return session

    def complete_checkout(self, session_id: str, card: dict, on_session: bool = False) -> dict:
        """The customer submits a card on the hosted page (`on_session` when a
        person did, authenticating if asked). Setup mode: saves it."""
        session = self.get("checkout.session", session_id)
        if session["mode"] == "payment":
            return self._pay_checkout(session, card, on_session)
        return self._save_checkout_card(session, card)

    def _pay_checkout(self, session: dict, card: dict, on_session: bool) -> dict:
        """Payment mode: a PaymentIntent charges the card for the session's
        total. Paid, the session completes (and the card is saved on its
        customer when `setup_future_usage` asked); declined, it stays open for
        another card, as Checkout's page does, and the card error is raised."""
        if session["status"] != "open":
            raise _invalid("This Checkout Session is no longer open.")
        saves = session["id"] in self.state.saves_card and session.get("customer")
        pm = self.put(
            objects.payment_method(
                self.now(), session["customer"] if saves else None, card, self.state.livemode
            )
        )
        self.state.behaviors[pm["id"]] = CardBehavior.from_json(card.get("behavior", {}))
        intent, chg, error = self._charge(
            session["amount_total"], session["currency"], session.get("customer"), pm, on_session
        )
        intent["metadata"] = dict(session.get("metadata") or {})
        if error is not None:
            self.emit("charge.failed", chg)
            self.emit("payment_intent.payment_failed", intent)
            raise ApiError(402, {k: v for k, v in error.items() if k != "payment_method"})
        session.update(status="complete", payment_status="paid", payment_intent=intent["id"])
        if saves:
            self.emit("payment_method.attached", pm)
        self.emit("charge.succeeded", chg)
        self.emit("payment_intent.succeeded", intent)
        self.emit("checkout.session.completed", session)
        return session

    def _save_checkout_card(self, session: dict, card: dict) -> dict:
        """Setup mode: like Stripe, the card is saved and the session completes,
        but no default changes."""
        if session["status"] != "open":
            raise _invalid("This Checkout Session is no longer open.")
        customer_id = session["customer"]
        pm = self.put(objects.payment_method(self.now(), customer_id, card, self.state.livemode))
        self.state.behaviors[pm["id"]] = CardBehavior.from_json(card.get("behavior", {}))
        intent = self.put(
            objects.setup_intent(self.now(), customer_id, pm["id"], self.state.livemode)
        )
        session.update(status="complete", setup_intent=intent["id"])
        self.emit("payment_method.attached", pm)
        self.emit("setup_intent.succeeded", intent)
        self.emit("checkout.session.completed", session)
        return session

    def _failed_invoice(self, body: dict) -> dict:
        """Customer, card, subscription and an invoice whose first attempt fails.
        With "card_on": "subscription" (or "invoice") the declining card is the
        subscription's own default (as Checkout sets it) or the invoice's, and
        the customer's default is another, working card that Stripe does not
        charge for this invoice. "other_cards" are further cards saved on the
        customer, each with its own behaviour, that nothing charges unasked."""
        behavior = {
            "mode": "decline",
            "decline_code": "insufficient_funds",
            **body.get("behavior", {}),
        }
        customer = self._create_customer(
            {
                "email": body.get("email", "jenny.rosen@example.com"),
                "name": body.get("name", "Jenny Rosen"),
                "card": {**body.get("card", {}), "behavior": behavior},
                "other_cards": body.get("other_cards"),
            }
        )
        _status, invoice = self.control(
            "POST",
            "/_sim/invoices",
            {
                "customer": customer["id"],
                "amount": body.get("amount", 2000),
                "currency": body.get("currency", "usd"),
                "subscription": "auto",
                "next_payment_attempt": body.get("next_payment_attempt"),
            },
        )
        # A phone and metadata on the customer (SMS consent lives there).
        customer["phone"] = body.get("phone", customer.get("phone"))
        customer["metadata"].update(body.get("metadata") or {})
        if body.get("address"):
            # Stripe copies the customer's address onto the invoice it finalizes.
            customer["address"].update(body["address"])
            invoice["customer_address"] = dict(customer["address"])
        declining = customer["invoice_settings"]["default_payment_method"]
        if body.get("card_on") in ("subscription", "invoice"):
            owner = (
                self.get("subscription", invoice["subscription"])
                if body["card_on"] == "subscription"
                else invoice
            )
            owner["default_payment_method"] = declining
            other = self.put(
                objects.payment_method(self.now(), customer["id"], {}, self.state.livemode)
            )
            customer["invoice_settings"]["default_payment_method"] = other["id"]
            if body["card_on"] == "invoice" and body.get("subscription_card"):
                # The subscription names yet another card, which Stripe does
                # not charge: the invoice's own default comes first.
                own = self.put(
                    objects.payment_method(
                        self.now(), customer["id"], body["subscription_card"], self.state.livemode
                    )
                )
                self.get("subscription", invoice["subscription"])["default_payment_method"] = own[
                    "id"
                ]
        _intent, chg, error = self.attempt_payment(invoice, self.default_payment_method(invoice))
        return {
            "customer": customer["id"],
            "invoice": invoice["id"],
            "subscription": invoice["subscription"],
            "charge": chg["id"],
            "payment_method": declining,
            "error": error,
        }

    # -- HTTP ---------------------------------------------------------------

    def _take_fault(self, path: str) -> Fault | None:
        for fault in self.state.faults:
            if path.startswith(fault.path_prefix) and fault.count > 0:
                fault.count -= 1
                return fault
        return None

    def handle(self, method: str, path: str, query: str, body: bytes, headers: dict[str, str]):
        """Answer one request: (status, JSON-able body, extra headers)."""
        if path.startswith("/_sim/"):
            if path == "/_sim/webhooks/flush":
                return 200, {"deliveries": self.flush()}, {}
            data = json.loads(body or b"{}")
            with self.lock:
                try:
                    return (*self.control(method, path, data), {})
                except ApiError as exc:
                    return exc.status, {"error": exc.body}, {}
        if path.startswith("/hosted/") and not _asks_for_json(headers):
            page = self._hosted_page(method, path, body)
            return page.status, page, {}
        if path.startswith("/hosted/checkout/"):
            return self._hosted_checkout(method, path.rsplit("/", 1)[-1], body)
        if path.startswith("/hosted/invoices/"):
            return self._hosted_invoice(method, path.rsplit("/", 1)[-1], body)
        if not path.startswith("/v1/"):
            return 404, {"error": {"type": "invalid_request_error", "message": "Not found"}}, {}
        auth = headers.get("authorization", "")
        if auth.removeprefix("Bearer ") in self.state.revoked_keys:
            return (
                401,
                {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "api_key_expired",
                        "message": "Expired API Key provided",
                    }
                },
                {},
            )
        if not auth.startswith("Bearer sk_") and not auth.startswith("Bearer rk_"):
            return (
                401,
                {"error": {"type": "authentication_error", "message": "Invalid API Key provided"}},
                {},
            )
        with self.lock:
            fault = self._take_fault(path)
            limited = method == "POST" and not self._take_write_token()
            if method == "POST":
                self.state.writes.append((time.monotonic(), 429 if limited else 200))
        if limited:
            return 429, _RATE_LIMITED, {}
        if fault is not None and fault.when == "before":
            return self._fault_answer(fault)
        if fault is not None and fault.when == "slow":  # a slow answer, then as usual
            time.sleep(fault.delay)
            fault = None
        params = decode_form(query if method in ("GET", "DELETE") else body.decode())
        key = headers.get("idempotency-key")
        with self.lock:
            self.state.requests_seen.append((method, path, key))
            if method == "POST" and key:
                fingerprint = hashlib.sha256(
                    f"{method} {path} {json.dumps(params, sort_keys=True)}".encode()
                ).hexdigest()
                stored = self.state.idempotency.get((self._account(auth), key))
                if stored is not None:
                    if stored[0] != fingerprint:
                        return (
                            400,
                            {
                                "error": {
                                    "type": "idempotency_error",
                                    "message": _IDEMPOTENCY_MISMATCH.format(key=key),
                                }
                            },
                            {},
                        )
                    return stored[1], json.loads(stored[2]), {"Idempotent-Replayed": "true"}
            self._current_key = key
            try:
                status, answer = self.api(method, path, params)
            except ApiError as exc:
                status, answer = exc.status, {"error": exc.body}
            if method == "POST" and key and status != 429 and status < 500:
                self.state.idempotency[(self._account(auth), key)] = (
                    fingerprint,
                    status,
                    json.dumps(answer).encode(),
                )
        if fault is not None and fault.when == "late":  # acted; the answer comes late
            time.sleep(fault.delay)
        elif fault is not None:  # "after": the effect happened; the answer is lost
            return self._fault_answer(fault)
        return status, answer, {"Idempotency-Key": key} if key else {}

    # -- the pages a person sees (hosted.py draws them) ------------------------

    def _hosted_page(self, method: str, path: str, body: bytes) -> hosted.Html:
        kind, _, ident = path.removeprefix("/hosted/").partition("/")
        form = {}
        if method == "POST":
            form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        with self.lock:
            try:
                if kind == "checkout":
                    return self._checkout_html(ident, method, form)
                if kind == "invoices":
                    return self._invoice_html(ident, method, form)
                if kind == "portal":
                    return self._portal_html(ident, method, form)
            except ApiError as exc:
                message = exc.body.get("message", "Not found")
                return hosted.Html(hosted.page("Not found", f"<h1>{escape(message)}</h1>"), 404)
        return hosted.Html(hosted.page("Not found", "<h1>Not found</h1>"), 404)

    def _card_or_challenge(
        self, form: dict[str, str], authenticates: bool, keep: dict[str, str]
    ) -> hosted.Html | None:
        """None when the customer may go on: no authentication asked, or done."""
        if not authenticates or form.get("authenticate") == "complete":
            return None
        if form.get("authenticate") == "fail":
            raise hosted.CardRefused(
                "We are unable to authenticate your payment method. Please choose a"
                " different payment method and try again."
            )
        return hosted.Html(hosted.challenge(form.get("number", ""), keep))

    def _checkout_html(self, session_id: str, method: str, form: dict[str, str]) -> hosted.Html:
        session = self.get("checkout.session", session_id)
        if method != "POST" or session["status"] != "open":
            return hosted.Html(hosted.checkout_page(session))
        try:
            card = hosted.read_card(form.get("number", ""))
            asked = self._card_or_challenge(form, card.authenticates, {})
        except hosted.CardRefused as refused:
            return hosted.Html(hosted.checkout_page(session, str(refused)), 402)
        if asked is not None:
            return asked
        try:
            self.complete_checkout(session_id, card.card(), on_session=True)
        except ApiError as declined:
            message = hosted.decline_message(declined.body.get("decline_code"))
            return hosted.Html(hosted.checkout_page(session, message), 402)
        target = (session.get("success_url") or "").replace("{CHECKOUT_SESSION_ID}", session_id)
        if target:
            return hosted.Html(status=303, location=target)
        return hosted.Html(hosted.page("Card saved", "<h1>Card saved</h1>"))

    def _invoice_html(self, invoice_id: str, method: str, form: dict[str, str]) -> hosted.Html:
        invoice = self.get("invoice", invoice_id)
        try:
            on_file: dict | None = self.default_payment_method(invoice)
        except ApiError:
            on_file = None
        if method != "POST" or invoice["status"] != "open":
            return hosted.Html(hosted.invoice_page(invoice, on_file))
        try:
            if form.get("use") == "on_file" and on_file is not None:
                pm = on_file
                behaviour = self.state.behaviors.get(pm["id"], CardBehavior())
                asked = self._card_or_challenge(
                    form, behaviour.mode == "authenticate", {"use": "on_file"}
                )
            else:
                card = hosted.read_card(form.get("number", ""))
                asked = self._card_or_challenge(form, card.authenticates, {})
                if asked is None:
                    pm = self.put(
                        objects.payment_method(
                            self.now(), invoice["customer"], card.card(), self.state.livemode
                        )
                    )
                    self.state.behaviors[pm["id"]] = CardBehavior.from_json(card.card()["behavior"])
        except hosted.CardRefused as refused:
            return hosted.Html(hosted.invoice_page(invoice, on_file, str(refused)), 402)
        if asked is not None:
            return asked
        _intent, _charge, error = self.attempt_payment(invoice, pm, on_session=True)
        if error is not None:
            message = hosted.decline_message(error.get("decline_code"))
            return hosted.Html(hosted.invoice_page(invoice, on_file, message), 402)
        return hosted.Html(hosted.invoice_page(invoice, on_file))

    def _portal_html(self, session_id: str, method: str, form: dict[str, str]) -> hosted.Html:
        session = self.get("billing_portal.session", session_id)
        customer = self.get("customer", session["customer"])

        def shown(saved: bool = False, error: str | None = None, status: int = 200):
            cards = [
                o
                for o in self.state.objects.values()
                if o.get("object") == "payment_method" and o.get("customer") == customer["id"]
            ]
            default = customer["invoice_settings"].get("default_payment_method")
            return hosted.Html(hosted.portal_page(session, cards, default, saved, error), status)

        if method != "POST":
            return shown()
        try:
            card = hosted.read_card(form.get("number", ""))
            asked = self._card_or_challenge(form, card.authenticates, {})
        except hosted.CardRefused as refused:
            return shown(error=str(refused), status=402)
        if asked is not None:
            return asked
        self._change_card(customer["id"], card.card())
        return shown(saved=True)

    def _hosted_checkout(self, method: str, session_id: str, body: bytes):
        """Stripe's hosted page, reduced to what a test customer does: GET shows
        the session, POST {"card": {...}} submits a card."""
        with self.lock:
            try:
                if method == "POST":
                    card = json.loads(body or b"{}").get("card", {})
                    return 200, self.complete_checkout(session_id, card, on_session=True), {}
                return 200, self.get("checkout.session", session_id), {}
            except ApiError as exc:
                return exc.status, {"error": exc.body}, {}

    def _hosted_invoice(self, method: str, invoice_id: str, body: bytes):
        """The hosted invoice page, reduced to what a test customer does: GET shows
        the invoice, POST pays it, authenticating if the bank asks, with the card
        on file or {"card": {...}} entered there."""
        with self.lock:
            try:
                invoice = self.get("invoice", invoice_id)
                if method != "POST":
                    return 200, invoice, {}
                if invoice["status"] != "open":
                    raise _invalid(f"This invoice is {invoice['status']}.")
                card = json.loads(body or b"{}").get("card")
                pm = self.default_payment_method(invoice)
                if card is not None:
                    pm = self.put(
                        objects.payment_method(
                            self.now(), invoice["customer"], card, self.state.livemode
                        )
                    )
                    self.state.behaviors[pm["id"]] = CardBehavior.from_json(
                        card.get("behavior", {})
                    )
                _intent, _charge, error = self.attempt_payment(invoice, pm, on_session=True)
                if error is not None:
                    return 402, {"error": error}, {}
                return 200, invoice, {}
            except ApiError as exc:
                return exc.status, {"error": exc.body}, {}

    def _take_write_token(self) -> bool:
        rate = self.state.write_rate
        if rate is None:
            return True
        now = time.monotonic()
        self.state.write_tokens = min(
            rate, self.state.write_tokens + (now - self.state.write_checked) * rate
        )
        self.state.write_checked = now
        if self.state.write_tokens < 1:
            return False
        self.state.write_tokens -= 1
        return True

    @staticmethod
    def _fault_answer(fault: Fault):
        if fault.status is None:
            time.sleep(fault.delay)
            return 500, {"error": {"type": "api_error", "message": "Timed out"}}, {}
        kind = "rate_limit_error" if fault.status == 429 else "api_error"
        code = "rate_limit" if fault.status == 429 else None
        return (
            fault.status,
            {"error": {"type": kind, "code": code, "message": "Injected fault"}},
            {},
        )

    @staticmethod
    def _account(auth: str) -> str:
        return hashlib.sha256(auth.encode()).hexdigest()

    def wsgi(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        headers["content-type"] = environ.get("CONTENT_TYPE", "")
        try:
            status, answer, extra = self.handle(
                environ["REQUEST_METHOD"],
                environ.get("PATH_INFO", ""),
                environ.get("QUERY_STRING", ""),
                body,
                headers,
            )
        except (KeyError, ValueError, TypeError) as exc:
            status, answer, extra = (
                400,
                {"error": {"type": "invalid_request_error", "message": f"Bad request: {exc}"}},
                {},
            )
        if isinstance(answer, hosted.Html):
            page = answer
            start_response(
                f"{page.status} {_PHRASES.get(page.status, 'Error')}",
                [
                    ("Content-Type", "text/html; charset=utf-8"),
                    ("Cache-Control", "no-store"),
                    *([("Location", page.location)] if page.location else []),
                ],
            )
            return [page.body.encode()]
        data = json.dumps(answer).encode()
        request_id = "req_" + hashlib.sha256(data + str(time.time()).encode()).hexdigest()[:14]
        start_response(
            f"{status} {_PHRASES.get(status, 'Error')}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Request-Id", request_id),
                *extra.items(),
            ],
        )
        return [data]


def _asks_for_json(headers: dict[str, str]) -> bool:
    """A hosted page is a page: to a browser, curl or anything that does not
    say otherwise. JSON goes only to a program that sends it or asks for it
    alone (the demo's and the tests' simulated customers)."""
    accept = headers.get("accept", "").split(",")[0].split(";")[0].strip()
    sends = headers.get("content-type", "").split(";")[0].strip()
    return sends == "application/json" or accept == "application/json"


def _line_items_total(items: Any) -> tuple[int, str]:
    """A payment-mode session's total and currency, from its line items."""
    if not isinstance(items, list) or not items:
        raise _invalid("line_items is required in payment mode.", "line_items")
    total, currencies = 0, set()
    for index, item in enumerate(items):
        data = item.get("price_data") if isinstance(item, dict) else None
        if not isinstance(data, dict):
            raise _invalid(
                "This simulator takes line items with price_data, not saved prices.",
                f"line_items[{index}][price_data]",
            )
        try:
            unit, quantity = int(data.get("unit_amount", "")), int(item.get("quantity", "1"))
        except (TypeError, ValueError):
            raise _invalid(
                "Invalid integer: unit_amount and quantity are whole numbers.",
                f"line_items[{index}]",
            ) from None
        if unit < 0 or quantity < 1:
            raise _invalid(
                "unit_amount must be at least 0 and quantity at least 1.", f"line_items[{index}]"
            )
        total += unit * quantity
        currencies.add(str(data.get("currency") or "").lower())
    if len(currencies) != 1 or "" in currencies:
        raise _invalid("Every line item needs the same currency.", "line_items")
    return total, currencies.pop()


def _mark_paid(invoice: dict, now: int, **extra) -> None:
    invoice.update(
        status="paid",
        amount_paid=invoice["amount_due"],
        amount_remaining=0,
        next_payment_attempt=None,
        **extra,
    )
    invoice["status_transitions"]["paid_at"] = now


_IDEMPOTENCY_MISMATCH = (
    "Keys for idempotent requests can only be used with the same parameters they were first "
    "used with. Try using a key other than '{key}' if you meant to execute a different request."
)

_PHRASES = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
