"""The engine end to end on PostgreSQL: signed webhooks over HTTP, the real
receiver, `tick` passes on a simulated clock, Stripe played by the simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from zoneinfo import ZoneInfo

import stripe
from sqlalchemy import select

from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import learner, plans
from recovery.models import AuditEntry, Customer, Message, RecoveryAttempt

from .conftest import ROOT, T0
from .factories import sim_post, steps_of, the_case


def test_soft_decline_is_retried_on_plan_until_it_pays(stack):
    pays_from = T0 + timedelta(days=2, hours=12)
    scenario = stack.failed(
        {
            "mode": "decline",
            "decline_code": "insufficient_funds",
            "succeed_after": int(pays_from.timestamp()),
        },
    )
    stack.tick()
    case = the_case(scenario["invoice"])
    assert case.category == "funds" and case.mode == "take_over"
    planned = {s.step: s for s in steps_of(case.id)}
    assert {"email:funds:0", "retry:1", "final"} <= set(planned)
    assert planned["email:funds:0"].outcome == "queued"  # day 0 email, at once
    assert planned["retry:1"].due_at > T0

    stack.run_until(T0 + timedelta(days=6))
    case = the_case(scenario["invoice"])
    assert case.status == "recovered" and case.amount_recovered == 2000
    retries = [s for s in steps_of(case.id) if s.kind == "retry" and s.status == "done"]
    assert [s.outcome for s in retries][-1] == "paid"
    assert all(s.outcome == "declined" for s in retries[:-1])
    assert all(s.executed_at >= pays_from for s in retries[-1:])
    # Each answer is counted where the retry learner will look for it.
    # Each in the slot of the bet it made: after the decline before it.
    declined_before = [case.first_failed_at] + [s.executed_at for s in retries[:-1]]
    assert [s.slot for s in retries] == [
        learner.slot_of("funds", case.first_failed_at, s.executed_at, plans.zone(None), before)
        for s, before in zip(retries, declined_before, strict=True)
    ]
    # One API charge per retry, each with its own key.
    charges = stack.charges(scenario["invoice"])
    assert len(charges) == len(retries) and len({c[2] for c in charges}) == len(charges)
    later = [s for s in steps_of(case.id) if s.status == "scheduled"]
    assert later == []  # recovery canceled the rest of the plan


def test_retries_go_at_the_morning_of_the_customers_billing_address(stack):
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "insufficient_funds"},
        address={"country": "US", "state": "CA", "postal_code": "94107"},
    )
    stack.tick()
    case = the_case(scenario["invoice"])
    with session_scope() as session:
        customer = session.get(Customer, case.customer_id)
        assert customer.timezone == "America/Los_Angeles"
    retry = next(s for s in steps_of(case.id) if s.step == "retry:1")
    local = retry.due_at.astimezone(ZoneInfo("America/Los_Angeles"))
    assert local.hour == 9  # a payday morning in California, 17:00 UTC


def test_a_retry_due_with_a_reminder_goes_first_and_the_reminder_is_not_sent(stack):
    scenario = stack.failed(
        {
            "mode": "decline",
            "decline_code": "insufficient_funds",
            "succeed_after": int((T0 + timedelta(hours=1)).timestamp()),
        },
    )
    stack.tick()
    case = the_case(scenario["invoice"])
    planned = {s.step: s for s in steps_of(case.id)}
    retry, reminder = planned["retry:1"], planned["email:funds:1"]
    # The reminder was planned before the retry (a lower id): both due at once.
    assert reminder.id < retry.id
    from sqlalchemy import update

    with session_scope() as session:
        session.execute(
            update(RecoveryAttempt)
            .where(RecoveryAttempt.id == reminder.id)
            .values(due_at=retry.due_at)
        )
    stack.tick(retry.due_at + timedelta(minutes=30))
    assert the_case(scenario["invoice"]).status == "recovered"
    outcomes = {s.step: s.outcome for s in steps_of(case.id)}
    assert outcomes["retry:1"] == "paid" and outcomes["email:funds:1"] != "queued"
    with session_scope() as session:
        sent = session.scalars(select(Message.template).where(Message.case_id == case.id)).all()
    assert sorted(sent) == ["payment_failed", "recovered"]  # day 0, and the thank-you


def test_card_update_retries_at_once_and_recovers(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    case = the_case(scenario["invoice"])
    assert case.category == "customer_action"
    # No retry of the expired card; one on another saved card, if there is one.
    assert [s.origin for s in steps_of(case.id) if s.kind == "retry"] == ["backup_card"]
    with session_scope() as session:
        assert session.scalars(select(Message.template)).all() == ["card_update_needed"]

    stack.at(T0 + timedelta(minutes=5))  # the customer reads the email, then
    sim_post(stack.sim.url, f"/_sim/customers/{scenario['customer']}/cards", {})
    result = stack.tick(T0 + timedelta(minutes=10))
    case = the_case(scenario["invoice"])
    assert case.status == "recovered"
    assert result.outcomes.get("paid") == 1
    retry = next(s for s in steps_of(case.id) if s.origin == "card_update")
    assert retry.step.startswith("retry:card-update:") and retry.outcome == "paid"
    assert retry.slot is None  # a new card teaches nothing about when the old one pays


def test_a_one_off_checkout_payment_by_the_customer_is_not_a_new_card(stack):
    """The business sells the customer something else through Checkout in
    payment mode while the renewal is open: the renewal's card is unchanged,
    so it is no reason to retry and no card becomes the default."""
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    case = the_case(scenario["invoice"])
    before = {s.step for s in steps_of(case.id)}
    client = stripe.StripeClient(
        "sk_test_shop", base_addresses={"api": stack.sim.url}, max_network_retries=0
    )
    sale = client.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "customer": scenario["customer"],
            "line_items": [{"price_data": {"currency": "usd", "unit_amount": 500}, "quantity": 1}],
            "success_url": "https://billing.acme-shop.io/thanks",
        }
    )
    stack.at(T0 + timedelta(minutes=5))
    sim_post(stack.sim.url, f"/hosted/checkout/{sale.id}", {"card": {"brand": "visa"}})
    assert client.v1.checkout.sessions.retrieve(sale.id).payment_status == "paid"
    stack.tick(T0 + timedelta(minutes=10))
    case = the_case(scenario["invoice"])
    assert case.status == "open"
    assert {s.step for s in steps_of(case.id)} == before  # no card-update retry
    customer = client.v1.customers.retrieve(scenario["customer"])
    assert customer.invoice_settings.default_payment_method == scenario["payment_method"]


def test_suspected_fraud_is_flagged_with_no_retry_and_no_email(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "fraudulent"})
    stack.tick()
    stack.run_until(T0 + timedelta(days=3), timedelta(hours=6))
    case = the_case(scenario["invoice"])
    assert case.category == "do_not_contact" and case.flag_reason.startswith("do_not_contact")
    assert case.status == "open" and steps_of(case.id) == []
    assert stack.charges(scenario["invoice"]) == []


def test_dead_card_is_never_retried_but_the_customer_is_asked(stack):
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "do_not_honor", "network_decline_code": "14"},
        card={"brand": "visa"},
    )
    stack.tick()
    stack.run_until(T0 + timedelta(days=9), timedelta(hours=12))
    case = the_case(scenario["invoice"])
    assert case.category == "dead_card"
    assert stack.charges(scenario["invoice"]) == []
    with session_scope() as session:
        templates = session.scalars(select(Message.template)).all()
    assert templates and set(templates) == {"card_update_needed"}


def test_assist_mode_when_stripe_still_retries(stack):
    next_attempt = int((T0 + timedelta(days=3)).timestamp())
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "insufficient_funds"},
        next_payment_attempt=next_attempt,
    )
    stack.tick()
    case = the_case(scenario["invoice"])
    assert case.mode == "assist"
    kinds = {s.kind for s in steps_of(case.id)}
    assert kinds == {"email"}  # Stripe retries; we write, and retry only on a card update


def test_injected_faults_never_double_charge(stack):
    invoices = []
    for _ in range(10):
        scenario = stack.failed(
            {
                "mode": "decline",
                "decline_code": "processing_error",
                # Before the plan's first try, a few hours after the failure.
                "succeed_after": int((T0 + timedelta(hours=2)).timestamp()),
            },
        )
        invoices.append(scenario["invoice"])
    stack.tick()
    for status in (500, 429, "timeout"):
        sim_post(
            stack.sim.url,
            "/_sim/faults",
            {
                "path_prefix": "/v1/invoices",
                "status": status,
                "count": 4,
                "delay": 0.05,
                "when": "after" if status == "timeout" else "before",
            },
        )
    stack.run_until(T0 + timedelta(days=4), timedelta(hours=2))
    for invoice_id in invoices:
        assert the_case(invoice_id).status == "recovered"
        charges = stack.charges(invoice_id)
        assert len(charges) == 1, charges  # the first retry pays; replays charge nothing
    with session_scope() as session:
        deferred = session.scalars(select(RecoveryAttempt).where(RecoveryAttempt.tries > 0)).all()
    assert deferred, "the faults were not met"


def test_worker_killed_mid_retry_completes_later_with_one_charge(stack, pg_url):
    scenario = stack.failed(
        {
            "mode": "decline",
            "decline_code": "processing_error",
            "succeed_after": int((T0 + timedelta(hours=1)).timestamp()),
        },
    )
    stack.tick()
    case = the_case(scenario["invoice"])
    retry = next(s for s in steps_of(case.id) if s.step == "retry:1")
    # Stripe charges, then the answer is held back: the worker dies waiting.
    sim_post(
        stack.sim.url,
        "/_sim/faults",
        {
            "path_prefix": f"/v1/invoices/{scenario['invoice']}/pay",
            "status": "timeout",
            "when": "after",
            "delay": 60,
            "count": 1,
        },
    )
    env = {
        **os.environ,
        "DATABASE_URL": pg_url,
        "STRIPE_API_BASE": stack.sim.url,
        "BROKER_URL": "memory://",
    }
    stack.at(retry.due_at)  # the simulator's time, which the killed process runs at too
    worker = subprocess.Popen(
        [sys.executable, "-m", "recovery", "tick", "--now", retry.due_at.isoformat(), "--sync"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not stack.charges(scenario["invoice"]):
        assert time.monotonic() < deadline and worker.poll() is None, "no charge was made"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    assert the_case(scenario["invoice"]).status == "open"
    stuck = next(s for s in steps_of(case.id) if s.id == retry.id)
    assert stuck.status == "executing"

    stack.tick(retry.due_at + timedelta(seconds=get_settings().step_lease_seconds + 1))
    assert the_case(scenario["invoice"]).status == "recovered"
    assert len(stack.charges(scenario["invoice"])) == 1
    done = next(s for s in steps_of(case.id) if s.id == retry.id)
    # Taken again after its lease; Stripe is asked first, so the charge the dead
    # worker made is found (by the webhook or the invoice), never made twice.
    assert done.status == "done" and done.claims == 2
    assert done.outcome in ("paid", "invoice_paid")
    # Whichever of the step and invoice.paid finished first, the recovery is
    # the retry's, not "paid elsewhere".
    assert the_case(scenario["invoice"]).recovery_path == "retry"


def test_events_are_audited_with_the_engine_decision(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    with session_scope() as session:
        actions = session.scalars(select(AuditEntry.action)).all()
    assert "classified" in actions and "payment_failed" in actions
    assert the_case(scenario["invoice"]).first_failed_at == T0
