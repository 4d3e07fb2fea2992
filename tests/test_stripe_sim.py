"""The Stripe-compatible server through the real SDK and recovery.stripe_api."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stripe

from recovery import stripe_api
from recovery.sim.objects import FIXTURES

from .factories import sim_post

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "stripe" / "fixtures3.json"


def sdk(sim, timeout: float = 5) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_sdk",
        base_addresses={"api": sim.url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


@pytest.mark.skipif(not SHARED_FIXTURES.exists(), reason="shared/ is not beside the checkout")
def test_packaged_examples_are_stripes_own():
    ours = json.loads(FIXTURES.read_text())["resources"]
    theirs = json.loads(SHARED_FIXTURES.read_text())["resources"]
    assert ours == {name: theirs[name] for name in ours}


def test_decline_answers_like_stripe(sim):
    scenario = sim_post(
        sim.url,
        "/_sim/scenarios/failed_invoice",
        {
            "behavior": {
                "decline_code": "card_velocity_exceeded",
                "advice_code": "try_again_later",
                "network_advice_code": "24",
            }
        },
    )
    with pytest.raises(stripe.CardError) as declined:
        sdk(sim).v1.invoices.pay(
            scenario["invoice"], {"off_session": True}, {"idempotency_key": "pay-1"}
        )
    error = declined.value
    assert (error.http_status, error.code, error.error.decline_code) == (
        402,
        "card_declined",
        "card_velocity_exceeded",
    )
    body = error.json_body["error"]
    assert body["type"] == "card_error" and body["network_advice_code"] == "24"
    charge = sdk(sim).v1.charges.retrieve(body["charge"])
    assert charge.outcome.advice_code == "try_again_later"
    assert charge.outcome.reason == "card_velocity_exceeded"
    assert sdk(sim).v1.invoices.retrieve(scenario["invoice"]).attempt_count == 2


def test_idempotency_replay_and_mismatch(sim):
    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    client = sdk(sim)
    for _ in range(2):
        with pytest.raises(stripe.CardError) as declined:
            client.v1.invoices.pay(
                scenario["invoice"], {"off_session": True}, {"idempotency_key": "attempt-7"}
            )
    assert declined.value.headers.get("idempotent-replayed") == "true"
    # The replay did not charge again.
    assert client.v1.invoices.retrieve(scenario["invoice"]).attempt_count == 2
    with pytest.raises(stripe.IdempotencyError) as mismatch:
        client.v1.invoices.pay(
            scenario["invoice"], {"off_session": False}, {"idempotency_key": "attempt-7"}
        )
    assert mismatch.value.http_status == 400


def test_card_that_succeeds_after_a_time(sim):
    scenario = sim_post(
        sim.url, "/_sim/scenarios/failed_invoice", {"behavior": {"succeed_after": sim.now() + 3600}}
    )
    with pytest.raises(stripe_api.CardDeclined):
        stripe_api.pay_invoice(scenario["invoice"], "try-1")
    sim_post(sim.url, "/_sim/clock", {"advance": 3601})
    assert stripe_api.pay_invoice(scenario["invoice"], "try-2")["status"] == "paid"


def test_a_card_funded_only_after_payday_pays_only_inside_its_windows(sim):
    now = sim.now()
    windows = [[now + 3600, now + 7200], [now + 86_400, now + 90_000]]
    scenario = sim_post(
        sim.url, "/_sim/scenarios/failed_invoice", {"behavior": {"funded": windows}}
    )
    with pytest.raises(stripe_api.CardDeclined):
        stripe_api.pay_invoice(scenario["invoice"], "before")
    sim_post(sim.url, "/_sim/clock", {"advance": 7300})  # the first window has closed
    with pytest.raises(stripe_api.CardDeclined):
        stripe_api.pay_invoice(scenario["invoice"], "between")
    sim_post(sim.url, "/_sim/clock", {"advance": 86_400 - 7300})
    assert stripe_api.pay_invoice(scenario["invoice"], "inside")["status"] == "paid"


def test_an_opaque_decline_is_approved_on_some_attempts_the_same_ones_each_time(sim):
    def answers(draws: str, run: int) -> list[bool]:
        behavior = {
            "decline_code": "do_not_honor",
            "approve_chance": 0.4,
            "draws": draws,
            # The renewal itself declines; the issuer's coin is tossed from then on.
            "succeed_after": sim.now() + 1,
        }
        scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {"behavior": behavior})
        sim_post(sim.url, "/_sim/clock", {"advance": 2})
        found = []
        for n in range(12):
            try:
                stripe_api.pay_invoice(scenario["invoice"], f"{draws}-{run}-{n}")
            except stripe_api.CardDeclined:
                found.append(False)
            else:
                found.append(True)
                break
        return found

    first = answers("seed-a", 1)
    assert first[-1] is True and first == answers("seed-a", 2)


@pytest.mark.parametrize(
    "behavior",
    [{"approve_chance": 1.5}, {"approve_chance": "often"}, {"funded": [[1]]}, {"funded": "soon"}],
)
def test_a_bad_card_behaviour_is_refused(sim, behavior):
    with pytest.raises(AssertionError, match="approve_chance|funded"):
        sim_post(sim.url, "/_sim/scenarios/failed_invoice", {"behavior": behavior})


def test_errors_map_to_the_project_tree(sim):
    scenario = sim_post(
        sim.url,
        "/_sim/scenarios/failed_invoice",
        {"behavior": {"decline_code": "lost_card", "network_decline_code": "41"}},
    )
    with pytest.raises(stripe_api.CardDeclined) as declined:
        stripe_api.pay_invoice(scenario["invoice"], "attempt-1")
    assert declined.value.decline.decline_code == "lost_card"
    assert declined.value.decline.network_decline_code == "41"
    assert declined.value.decline.payment_intent_id.startswith("pi_")
    with pytest.raises(stripe_api.StripeNotFound):
        stripe_api.retrieve_invoice("in_missing")
    sim_post(sim.url, "/_sim/faults", {"path_prefix": "/v1/invoices", "status": 429})
    with pytest.raises(stripe_api.StripeRateLimited):
        stripe_api.retrieve_invoice(scenario["invoice"])
    sim_post(sim.url, "/_sim/faults", {"path_prefix": "/v1/invoices", "status": 500})
    with pytest.raises(stripe_api.StripeUnavailable):
        stripe_api.retrieve_invoice(scenario["invoice"])
    with pytest.raises(stripe_api.IdempotencyConflict):
        stripe_api.pay_invoice(scenario["invoice"], "attempt-1", payment_method="pm_other")
    with pytest.raises(ValueError, match="idempotency key"):
        stripe_api.pay_invoice(scenario["invoice"], "")


def test_write_rate_limit_answers_429_to_writes_only(sim):
    made = [sim_post(sim.url, "/_sim/scenarios/failed_invoice", {}) for _ in range(4)]
    sim_post(sim.url, "/_sim/rate_limit", {"writes_per_second": 2})
    outcomes = []
    for n, scenario in enumerate(made):
        try:
            stripe_api.pay_invoice(scenario["invoice"], f"rate-{n}")
            outcomes.append("answered")
        except stripe_api.CardDeclined:
            outcomes.append("answered")
        except stripe_api.StripeRateLimited:
            outcomes.append(429)
    # A full bucket of two, then writes faster than two a second are refused.
    assert outcomes[:2] == ["answered", "answered"] and 429 in outcomes[2:]
    assert stripe_api.retrieve_invoice(made[0]["invoice"])["id"] == made[0]["invoice"]
    writes = sim.state.writes
    assert [status for _, status in writes].count(429) == outcomes.count(429)


def test_timeouts_surface_as_unavailable(sim):
    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    sim_post(
        sim.url, "/_sim/faults", {"path_prefix": "/v1/invoices", "status": "timeout", "delay": 1.5}
    )
    with pytest.raises(stripe.APIConnectionError):
        sdk(sim, timeout=0.5).v1.invoices.retrieve(scenario["invoice"])


def test_sessions_customers_subscriptions_and_events(sim):
    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    session = stripe_api.create_setup_checkout_session(
        scenario["customer"], "https://example.test/ok", "https://example.test/back", "cs-1"
    )
    assert session["mode"] == "setup" and session["url"].startswith(sim.url)
    portal = stripe_api.create_billing_portal_session(
        scenario["customer"], "https://example.test", "bps-1"
    )
    assert portal["customer"] == scenario["customer"]
    assert stripe_api.retrieve_customer(scenario["customer"])["email"] == "jenny.rosen@example.com"
    pm = stripe_api.retrieve_payment_method(scenario["payment_method"])
    assert pm["card"]["brand"] == "visa"
    assert (
        stripe_api.list_invoices(customer=scenario["customer"])["data"][0]["id"]
        == (scenario["invoice"])
    )
    updated = stripe_api.update_subscription(
        scenario["subscription"], "sub-up-1", metadata={"note": "x"}
    )
    assert updated["metadata"] == {"note": "x"}
    assert stripe_api.cancel_subscription(scenario["subscription"], "sub-1")["status"] == (
        "canceled"
    )
    types = [e["type"] for e in stripe_api.list_events(limit=20)["data"]]
    assert "invoice.payment_failed" in types and "customer.subscription.deleted" in types
    with pytest.raises(stripe_api.StripeRequestRejected):
        stripe_api.create_setup_checkout_session(
            "cus_missing", "https://x/ok", "https://x/c", "cs-2"
        )


def test_expand_reaches_into_list_items_at_most_four_levels_deep(sim):
    failed = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    client = sdk(sim)
    listed = client.v1.invoice_payments.list(
        params={
            "invoice": failed["invoice"],
            "expand": ["data.payment.payment_intent.latest_charge"],
        }
    )
    intent = listed.data[0].payment.payment_intent
    assert intent.object == "payment_intent" and intent.latest_charge.id == failed["charge"]
    plain = client.v1.invoice_payments.list(params={"invoice": failed["invoice"]})
    assert isinstance(plain.data[0].payment.payment_intent, str)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.invoice_payments.list(
            params={
                "invoice": failed["invoice"],
                "expand": ["data.payment.payment_intent.latest_charge.customer"],
            }
        )
    assert refused.value.param == "expand"


def test_unauthenticated_requests_are_refused(sim):
    with pytest.raises(stripe.AuthenticationError):
        stripe.StripeClient(
            "pk_test_public", base_addresses={"api": sim.url}, max_network_retries=0
        ).v1.invoices.retrieve("in_x")


# -- the pages Stripe hosts, as a browser posts to them ---------------------------


def form_post(url: str, fields: dict[str, str]) -> tuple[int, str, str | None]:
    """A browser's form post: (status, page, Location), without following."""
    import html
    import http.client
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request(
        "POST",
        parts.path,
        body=urlencode(fields),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"},
    )
    answer = connection.getresponse()
    text = html.unescape(answer.read().decode())  # the page's words, as a person reads them
    return answer.status, text, answer.getheader("Location")


def test_hosted_pages_take_stripes_test_cards_and_do_what_stripe_does(sim):
    client = sdk(sim)
    failed = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    customer = failed["customer"]
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "setup",
            "customer": customer,
            "currency": "usd",
            "success_url": "https://billing.acme-shop.io/r/card-saved?s={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://billing.acme-shop.io/r/not-saved",
        }
    )
    events_before = len(sim.state.events)
    for number, says in (
        ("4000 0000 0000 0002", "Your card was declined."),
        ("4000000000009995", "Your card has insufficient funds."),
        ("4000000000000069", "Your card has expired."),
        ("1234 5678 9012 3456", "not one of Stripe's test cards"),
        ("", "Enter a card number."),
    ):
        status, page, _ = form_post(session.url, {"number": number})
        assert status == 402 and says in page, (number, page)
    assert len(sim.state.events) == events_before  # nothing saved, nothing sent
    # A card that asks for authentication: the challenge, then a failure or a save.
    status, page, _ = form_post(session.url, {"number": "4000002760003184"})
    assert status == 200 and "Complete authentication" in page and "Fail authentication" in page
    status, page, _ = form_post(session.url, {"number": "4000002760003184", "authenticate": "fail"})
    assert status == 402 and "unable to authenticate" in page
    status, _, location = form_post(
        session.url, {"number": "4000002760003184", "authenticate": "complete"}
    )
    assert status == 303
    assert location == f"https://billing.acme-shop.io/r/card-saved?s={session.id}"
    types = [e["type"] for e in sim.state.events[events_before:]]
    assert types == [
        "payment_method.attached",
        "setup_intent.succeeded",
        "checkout.session.completed",
    ]
    saved = sim.state.events[events_before]["data"]["object"]["id"]
    # Saved for off-session use, this card still asks when charged without the customer.
    assert sim.state.behaviors[saved].mode == "authenticate"
    assert client.v1.checkout.sessions.retrieve(session.id).status == "complete"
    status, page, _ = form_post(session.url, {"number": "4242424242424242"})
    assert "expired" in page  # a completed session takes no second card

    # The billing portal: a new card becomes the default, with Stripe's events.
    portal = client.v1.billing_portal.sessions.create(
        params={"customer": customer, "return_url": "https://billing.acme-shop.io/"}
    )
    status, page, _ = form_post(portal.url, {"number": "4000000000000341"})
    assert status == 200 and "Your new card is the default" in page and "0341 (default)" in page
    new_default = client.v1.customers.retrieve(customer).invoice_settings.default_payment_method
    assert sim.state.behaviors[new_default].decline_code == "generic_decline"  # 0341: charges fail
    assert [e["type"] for e in sim.state.events[-2:]] == [
        "payment_method.attached",
        "customer.updated",
    ]


def test_checkout_in_payment_mode_charges_the_card_and_saves_it_when_asked(sim):
    client = sdk(sim)
    customer = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})["customer"]
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "customer": customer,
            "line_items": [
                {
                    "price_data": {
                        "currency": "eur",
                        "unit_amount": 1250,
                        "product_data": {"name": "Extra seat"},
                    },
                    "quantity": 2,
                }
            ],
            "payment_intent_data": {"setup_future_usage": "off_session"},
            "success_url": "https://billing.acme-shop.io/paid?s={CHECKOUT_SESSION_ID}",
        }
    )
    assert (session.amount_total, session.currency) == (2500, "eur")
    assert (session.status, session.payment_status, session.payment_intent) == (
        "open",
        "unpaid",
        None,
    )
    events_before = len(sim.state.events)
    status, page, _ = form_post(session.url, {"number": "4000000000009995"})
    assert status == 402 and "insufficient funds" in page and "Pay €25.00" in page
    assert len(sim.state.events) == events_before  # refused when entered: nothing charged
    # Saved cards that decline every charge decline this one: the page asks again.
    status, page, _ = form_post(session.url, {"number": "4000000000000341"})
    assert status == 402 and "Your card was declined." in page
    assert [e["type"] for e in sim.state.events[events_before:]] == [
        "charge.failed",
        "payment_intent.payment_failed",
    ]
    assert client.v1.checkout.sessions.retrieve(session.id).status == "open"
    # Authentication on the page, then paid (this card asks on every charge).
    status, page, _ = form_post(session.url, {"number": "4000002760003184"})
    assert status == 200 and "Complete authentication" in page
    status, _, location = form_post(
        session.url, {"number": "4000002760003184", "authenticate": "complete"}
    )
    assert status == 303 and location == f"https://billing.acme-shop.io/paid?s={session.id}"
    paid = client.v1.checkout.sessions.retrieve(session.id)
    assert (paid.status, paid.payment_status) == ("complete", "paid")
    intent = client.v1.payment_intents.retrieve(paid.payment_intent)
    assert (intent.status, intent.amount, intent.currency) == ("succeeded", 2500, "eur")
    assert [e["type"] for e in sim.state.events[events_before + 2 :]] == [
        "payment_method.attached",
        "charge.succeeded",
        "payment_intent.succeeded",
        "checkout.session.completed",
    ]
    saved = client.v1.customers.payment_methods.list(customer)
    assert intent.payment_method in [pm.id for pm in saved.data]
    status, page, _ = form_post(session.url, {"number": "4242424242424242"})
    assert "Payment complete" in page  # paid once; a second card pays nothing

    # Without setup_future_usage the card pays and is not kept; nor without a customer.
    for buyer in (customer, None):
        once = client.v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "line_items": [{"price_data": {"currency": "usd", "unit_amount": 900}}],
                "success_url": "https://billing.acme-shop.io/paid",
                **({"customer": buyer} if buyer else {}),
            }
        )
        before = len(sim.state.events)
        status, _, _ = form_post(once.url, {"number": "4242 4242 4242 4242"})
        assert status == 303
        assert [e["type"] for e in sim.state.events[before:]] == [
            "charge.succeeded",
            "payment_intent.succeeded",
            "checkout.session.completed",
        ]
        assert sim.state.events[-1]["data"]["object"]["customer"] == buyer
    assert len(client.v1.customers.payment_methods.list(customer).data) == len(saved.data)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"mode": "subscription"}, "mode"),
        ({"mode": "payment"}, "line_items"),
        ({"mode": "payment", "line_items": [{"price": "price_123"}]}, "line_items[0][price_data]"),
        (
            {"mode": "payment", "line_items": [{"price_data": {"currency": "usd"}}]},
            "line_items[0]",
        ),
        (
            {
                "mode": "payment",
                "line_items": [{"price_data": {"currency": "usd", "unit_amount": {"x": "1"}}}],
            },
            "line_items[0]",
        ),
        (
            {
                "mode": "payment",
                "line_items": [
                    {"price_data": {"currency": "usd", "unit_amount": 100}},
                    {"price_data": {"currency": "eur", "unit_amount": 100}},
                ],
            },
            "line_items",
        ),
        (
            {
                "mode": "payment",
                "customer": "cus_missing",
                "line_items": [{"price_data": {"currency": "usd", "unit_amount": 100}}],
            },
            "customer",
        ),
    ],
)
def test_a_checkout_session_stripe_would_refuse_is_refused(sim, params, param):
    with pytest.raises(stripe.InvalidRequestError) as refused:
        sdk(sim).v1.checkout.sessions.create(params={"success_url": "https://x/ok", **params})
    assert refused.value.param == param
    assert not [o for o in sim.state.objects.values() if o.get("object") == "checkout.session"]


def test_the_hosted_invoice_page_pays_with_the_card_on_file_or_a_new_one(sim):
    declined = sim_post(
        sim.url, "/_sim/scenarios/failed_invoice", {"behavior": {"mode": "authenticate"}}
    )
    page_url = f"{sim.url}/hosted/invoices/{declined['invoice']}"
    # The card on file asks for authentication: the customer is there to give it.
    status, page, _ = form_post(page_url, {"use": "on_file"})
    assert status == 200 and "Complete authentication" in page
    status, page, _ = form_post(page_url, {"use": "on_file", "authenticate": "complete"})
    assert status == 200 and "Invoice paid" in page
    assert sdk(sim).v1.invoices.retrieve(declined["invoice"]).status == "paid"
    assert "invoice.paid" in [e["type"] for e in sim.state.events]

    other = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    page_url = f"{sim.url}/hosted/invoices/{other['invoice']}"
    status, page, _ = form_post(page_url, {"number": "4000000000000341"})
    assert status == 402 and "Your card was declined." in page
    status, page, _ = form_post(page_url, {"number": "5555 5555 5555 4444"})
    assert status == 200 and "Invoice paid" in page
    # A page to curl or anything that does not ask otherwise; JSON to a
    # program that asks for it alone.
    import urllib.request

    for accept in (None, "*/*", "text/html,application/json"):
        asked = urllib.request.Request(page_url, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(asked, timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/html"), accept
            assert "<html" in answer.read().decode().lower()
    asked = urllib.request.Request(page_url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(asked, timeout=10) as answer:
        assert json.loads(answer.read())["status"] == "paid"


def test_amounts_on_the_simulators_objects_are_the_invoices_own(sim):
    """The example objects Stripe publishes carry figures of their own (an
    amount overpaid of 149,300,825): none may survive on a $20 invoice."""
    declined = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    sim_post(sim.url, f"/hosted/invoices/{declined['invoice']}", {"card": {"brand": "visa"}})
    sdk(sim).v1.checkout.sessions.create(
        params={"mode": "setup", "customer": declined["customer"], "success_url": "https://x/ok",
                "currency": "usd"}
    )  # fmt: skip
    due = sim.state.objects[declined["invoice"]]["amount_due"]
    money_words = ("amount", "total", "balance", "capturable")
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, where)
        elif type(node) is int and any(word in where.rsplit(".", 1)[-1] for word in money_words):
            found.append((where, node))

    for obj in sim.state.objects.values():
        walk(obj, obj.get("object", "?"))
    assert found and all(0 <= value <= due for _, value in found), [
        f for f in found if not 0 <= f[1] <= due
    ]


def test_a_local_stripe_compatible_server_is_reached_without_the_environments_proxy(
    sim, monkeypatch
):
    from recovery.config import get_settings, load_settings
    from recovery.stripe_api import make_client

    from .conftest import free_port

    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    local = make_client(get_settings())
    answer = local.raw_request("get", f"/v1/invoices/{scenario['invoice']}")
    assert json.loads(answer.body)["id"] == scenario["invoice"]
    # Stripe itself is reached as the environment says, proxy included.
    remote = load_settings({"STRIPE_API_BASE": "https://api.stripe.com"})
    from recovery.stripe_api import _session

    assert _session(remote).trust_env and not _session(get_settings()).trust_env
