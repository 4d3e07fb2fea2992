"""The card Stripe will charge, and Stripe's word read right before we act.

The whole stack on the tests' clock: the simulator declines a renewal and
sends signed webhooks to the receiver; passes of the engine run retries and
emails against the simulator over HTTP with the real SDK."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from recovery import stripe_api
from recovery.db import session_scope
from recovery.models import Message, StepKind, StepOrigin, StepStatus

from .conftest import T0
from .factories import sim_post, steps_of, the_case

pytestmark = pytest.mark.services


def retries(case_id: int) -> list:
    return [s for s in steps_of(case_id) if s.kind is StepKind.RETRY]


@pytest.mark.parametrize(
    "behavior",
    [{"mode": "decline", "decline_code": "insufficient_funds"}, {"mode": "authenticate"}],
)
def test_a_new_customer_card_does_not_retry_a_subscription_that_charges_its_own(stack, behavior):
    """Checkout-made subscriptions carry their own default card, which Stripe
    charges before the customer's: a new customer default changes nothing."""
    scenario = stack.failed(behavior, card_on="subscription")
    stack.tick()
    stack.at(T0 + timedelta(minutes=5))
    sim_post(stack.sim.url, f"/_sim/customers/{scenario['customer']}/cards", {})
    stack.tick(T0 + timedelta(minutes=10))

    case = the_case(scenario["invoice"])
    assert case.status == "open"
    assert len(stack.charges(scenario["invoice"])) == 0  # only Stripe's own first attempt
    on_card = [s for s in retries(case.id) if s.origin is StepOrigin.CARD_UPDATE]
    assert [s.outcome for s in on_card] == ["blocked_same_card"]
    planned = [s for s in retries(case.id) if s.status is StepStatus.SCHEDULED]
    if behavior["mode"] == "authenticate":
        assert planned == []  # only the customer can authenticate
    else:
        assert planned and all(s.origin is StepOrigin.PLAN for s in planned)


@pytest.mark.parametrize("card_on", ["subscription", "invoice"])
def test_a_card_saved_through_our_link_is_charged_and_becomes_the_subscriptions_default(
    stack, card_on
):
    """Stripe would charge the invoice's own card, else the subscription's:
    the retry names the saved card, which becomes the subscription's default."""
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"}, card_on=card_on)
    stack.tick()
    stack.at(T0 + timedelta(minutes=5))
    checkout = stripe_api.create_setup_checkout_session(
        scenario["customer"], "https://example.com/ok", "https://example.com/no", "test-setup"
    )
    stack.sim.complete_checkout(checkout["id"], {})
    stack.tick(T0 + timedelta(minutes=10))

    case = the_case(scenario["invoice"])
    assert (case.status, case.recovery_path) == ("recovered", "card_update")
    saved = stack.sim.get(
        "setup_intent", stack.sim.get("checkout.session", checkout["id"])["setup_intent"]
    )["payment_method"]
    [(_invoice, charge_id, _key)] = stack.charges(scenario["invoice"])
    assert stack.sim.get("charge", charge_id)["payment_method"] == saved
    subscription = stack.sim.get("subscription", scenario["subscription"])
    assert subscription["default_payment_method"] == (saved if card_on == "subscription" else None)


def test_a_reminder_is_not_sent_for_an_invoice_paid_before_its_webhook_arrived(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.sim.flush()
    stack.drain(T0)  # the case is open, its first reminder due
    charged = stack.sim.default_payment_method(stack.sim.get("invoice", scenario["invoice"]))
    sim_post(stack.sim.url, f"/_sim/payment_methods/{charged['id']}/behavior", {})
    stack.sim.state.endpoints.clear()  # invoice.paid is late: not delivered yet
    sim_post(stack.sim.url, f"/_sim/invoices/{scenario['invoice']}/attempt")
    stack.tick()

    case = the_case(scenario["invoice"])
    assert (case.status, case.recovery_path) == ("recovered", "paid_elsewhere")
    with session_scope() as session:
        sent = session.scalars(select(Message.template).where(Message.case_id == case.id)).all()
    assert sent == []


def test_a_subscription_canceled_before_its_webhook_gets_no_reminder(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.sim.flush()
    stack.drain(T0)
    stack.sim.state.endpoints.clear()  # customer.subscription.deleted is late
    status, answer = stack.sim.api("DELETE", f"/v1/subscriptions/{scenario['subscription']}", {})
    assert status == 200, answer
    stack.tick()

    case = the_case(scenario["invoice"])
    assert case.status == "canceled"
    with session_scope() as session:
        sent = session.scalars(select(Message.template).where(Message.case_id == case.id)).all()
    assert sent == []


def test_a_subscription_canceled_before_its_webhook_is_not_charged(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()  # the first reminder goes out; retries are planned
    stack.sim.state.endpoints.clear()
    status, answer = stack.sim.api("DELETE", f"/v1/subscriptions/{scenario['subscription']}", {})
    assert status == 200, answer
    stack.run_until(T0 + timedelta(days=30), timedelta(hours=12))

    case = the_case(scenario["invoice"])
    assert case.status == "canceled"
    assert stack.charges(scenario["invoice"]) == []
    done = [s for s in steps_of(case.id) if s.status is StepStatus.DONE]
    assert [(s.kind, s.outcome) for s in done][-1] == (StepKind.RETRY, "subscription_canceled")
    with session_scope() as session:
        sent = session.scalars(select(Message.template).where(Message.case_id == case.id)).all()
    assert sent == ["payment_failed"]
