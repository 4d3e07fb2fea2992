"""The card Stripe will charge, and Stripe's word read right before we act.

The whole stack on the tests' clock: the simulator declines a renewal and
sends signed webhooks to the receiver; passes of the engine run retries and
emails against the simulator over HTTP with the real SDK."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from recovery import stripe_api
from recovery.db import session_scope
from recovery.engine import cases, scheduler, steps
from recovery.models import AuditEntry, Message, StepKind, StepOrigin, StepStatus

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
        # Only the customer can authenticate this card; another saved card
        # may still be tried (BACKUP_CARDS), never as a card-update retry.
        assert [s.origin for s in planned] == [StepOrigin.BACKUP_CARD]
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


# -- operators and a retry in flight, through the `recovery` command ---------------------


def recovery_command(*args: str) -> subprocess.Popen:
    """`recovery …` in its own process, on this test's database and simulator."""
    return subprocess.Popen(
        [sys.executable, "-m", "recovery", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )


def test_twenty_operator_retries_at_once_make_one_charge(stack):
    stack.at(datetime.now(UTC) - timedelta(hours=1))  # the commands run on the real clock
    scenario = stack.failed({"mode": "decline", "decline_code": "do_not_honor"})
    stack.tick()
    # The charge is slow, so the requests overlap it.
    sim_post(
        stack.sim.url,
        "/_sim/faults",
        {"path_prefix": f"/v1/invoices/{scenario['invoice']}/pay", "when": "slow", "delay": 1},
    )
    commands = [recovery_command("retry", scenario["invoice"]) for _ in range(20)]
    answers = [(*c.communicate(timeout=60), c.returncode) for c in commands]

    case = the_case(scenario["invoice"])
    operator_retries = [s for s in retries(case.id) if s.origin is StepOrigin.OPERATOR]
    assert len(operator_retries) == 1, answers
    assert len(stack.charges(scenario["invoice"])) == 1
    assert any(code == 0 and "declined" in out for out, _err, code in answers)
    for out, err, code in answers:  # the others joined it, or were told it just declined
        assert code == 0 or "moments ago" in err, (code, out, err)


@pytest.mark.parametrize("database", ["stack", "sqlite_stack"])
def test_a_cancel_while_a_retry_charges_is_recorded_after_the_charge(database, request):
    stack = request.getfixturevalue(database)
    stack.at(datetime.now(UTC) - timedelta(hours=1))  # the commands run on the real clock
    scenario = stack.failed({"mode": "decline", "decline_code": "do_not_honor"})
    stack.tick()
    sim_post(stack.sim.url, f"/_sim/payment_methods/{scenario['payment_method']}/behavior", {})
    slow = {"path_prefix": f"/v1/invoices/{scenario['invoice']}/pay", "when": "slow", "delay": 2}
    sim_post(stack.sim.url, "/_sim/faults", slow)
    retry = recovery_command("retry", scenario["invoice"])
    deadline = time.monotonic() + 30
    while stack.sim.state.faults[-1].count and time.monotonic() < deadline:
        time.sleep(0.02)  # until the pay call is at Stripe
    cancel = recovery_command("cancel", scenario["invoice"], "--reason", "refunded")
    retried = retry.communicate(timeout=60)
    assert retry.returncode == 0, retried
    _out, err = cancel.communicate(timeout=60)

    assert cancel.returncode == 1 and "is recovered" in err, err
    case = the_case(scenario["invoice"])
    assert (case.status, case.recovery_path) == ("recovered", "retry")
    assert len(stack.charges(scenario["invoice"])) == 1
    with session_scope() as session:
        timeline = session.scalars(
            select(AuditEntry.action).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id)
        ).all()
    assert timeline[-2:] == ["case_recovered", "cancel_refused"]


# -- leases and backoff count from each step's own start -----------------------------------


def test_a_step_run_late_in_its_batch_counts_lease_and_backoff_from_its_own_start(stack, settings):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    case = the_case(scenario["invoice"])
    first = next(s for s in retries(case.id) if s.status is StepStatus.SCHEDULED)
    lease = timedelta(seconds=settings.step_lease_seconds)
    [claim] = [c for c in steps.claim_due(first.due_at, 10, lease) if c[0] == first.id]
    # The batch was handed out at first.due_at; earlier steps of it took an hour.
    started = first.due_at + timedelta(hours=1)
    stack.at(started)
    sim_post(
        stack.sim.url,
        "/_sim/faults",
        {"path_prefix": f"/v1/invoices/{scenario['invoice']}", "status": 503, "count": 1},
    )
    assert scheduler.execute(claim, first.due_at, settings) == "deferred_unavailable"
    [again] = [s for s in steps_of(case.id) if s.id == first.id]
    assert again.due_at == started + timedelta(seconds=30)  # not at once: backoff from now

    [claim] = steps.claim_due(again.due_at, 10, lease)
    stack.at(again.due_at + timedelta(hours=1))
    assert scheduler.execute(claim, again.due_at, settings) == "declined"
    [done] = [s for s in steps_of(case.id) if s.id == first.id]
    assert done.executed_at == again.due_at + timedelta(hours=1)
    assert done.lease_until >= done.executed_at + lease


def test_a_stripe_call_ends_before_its_step_lease_does(settings):
    for lease in (5, 60, 300, 3600):
        shorter = dataclasses.replace(settings, step_lease_seconds=lease)
        assert stripe_api.request_timeout(shorter) <= lease / 2


# -- a recovery is credited to what made it ------------------------------------------------


def test_invoice_paid_arriving_before_the_retry_records_its_answer_credits_the_retry(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    case = the_case(scenario["invoice"])
    first = next(s for s in retries(case.id) if s.status is StepStatus.SCHEDULED)
    sim_post(stack.sim.url, f"/_sim/payment_methods/{scenario['payment_method']}/behavior", {})
    late = {"path_prefix": f"/v1/invoices/{scenario['invoice']}/pay", "when": "late", "delay": 1}
    sim_post(stack.sim.url, "/_sim/faults", late)
    stack.at(first.due_at)
    retry = threading.Thread(target=stack.tick)
    retry.start()
    deadline = time.monotonic() + 30
    while (
        not any(e["type"] == "invoice.paid" for e in stack.sim.state.events)
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    stack.drain(first.due_at)  # invoice.paid, while the pay call's answer is on its way
    retry.join(timeout=60)

    case = the_case(scenario["invoice"])
    assert (case.status, case.recovery_path, case.recovered_by_step) == (
        "recovered",
        "retry",
        "retry:1",
    )


def test_the_invoices_own_card_comes_before_its_subscriptions(stack):
    """Stripe charges the invoice's default payment method, then the
    subscription's: with both set, ours is the invoice's."""
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "insufficient_funds"},
        card_on="invoice",
        subscription_card={"fingerprint": "fpSUBSCRIPTION", "last4": "1111"},
    )
    stack.tick()
    invoice = stack.sim.get("invoice", scenario["invoice"])
    subscription = stack.sim.get("subscription", scenario["subscription"])
    assert invoice["default_payment_method"] != subscription["default_payment_method"] is not None
    card = stripe_api.card_to_charge(stripe_api.retrieve_invoice_state(scenario["invoice"]))
    assert card is not None and card.payment_method_id == invoice["default_payment_method"]
    assert card.fingerprint != "fpSUBSCRIPTION"
    # A retry charges that card too, and the case keeps its decline.
    case = the_case(scenario["invoice"])
    stack.run_until(T0 + timedelta(days=4), step=timedelta(hours=6))
    for _invoice, charge_id, _key in stack.charges(scenario["invoice"]):
        assert (
            stack.sim.get("charge", charge_id)["payment_method"]
            == invoice["default_payment_method"]
        )
    assert case.payment_method_id == invoice["default_payment_method"]


def test_a_retry_whose_answer_was_lost_sends_its_key_again_and_charges_once(stack):
    """Stripe declines the charge and the answer is lost: the step backs off,
    and its second run sends the same idempotency key, so Stripe answers
    with the first charge's decline instead of charging again."""
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    invoice_id = scenario["invoice"]
    case = the_case(invoice_id)
    first = next(s for s in retries(case.id) if s.step == "retry:1")
    sim_post(
        stack.sim.url,
        "/_sim/faults",
        {
            "path_prefix": f"/v1/invoices/{invoice_id}/pay",
            "status": "timeout",
            "when": "after",
            "delay": 0.05,
            "count": 1,
        },
    )
    stack.tick(first.due_at)
    [waiting] = [s for s in retries(case.id) if s.id == first.id]
    assert (waiting.status, waiting.tries) == (StepStatus.SCHEDULED, 1)
    stack.tick(waiting.due_at)
    pays = [
        key
        for _method, path, key in stack.sim.state.requests_seen
        if path == f"/v1/invoices/{invoice_id}/pay"
    ]
    assert len(pays) == 2 and pays[0] == pays[1] is not None
    assert len(stack.charges(invoice_id)) == 1
    [done] = [s for s in retries(case.id) if s.id == first.id]
    assert done.outcome == "declined"


def test_a_plan_change_keeps_a_step_that_backs_off_on_its_backoff(stack, settings):
    """Stripe was unavailable for a retry: it backs off. The failure's webhook
    then replans the case, and the retry stays on its backoff, not on the
    plan's moment."""
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    case = the_case(scenario["invoice"])
    first = next(s for s in retries(case.id) if s.step == "retry:1")
    sim_post(
        stack.sim.url,
        "/_sim/faults",
        {"path_prefix": f"/v1/invoices/{scenario['invoice']}", "status": 503, "count": 1},
    )
    stack.tick(first.due_at)
    [backing_off] = [s for s in retries(case.id) if s.id == first.id]
    assert backing_off.tries == 1 and backing_off.due_at > first.due_at
    with session_scope() as session:
        cases.replan(session, cases.locked(session, case.id), first.due_at, settings)
    [after] = [s for s in retries(case.id) if s.id == first.id]
    assert (after.status, after.due_at) == (StepStatus.SCHEDULED, backing_off.due_at)
