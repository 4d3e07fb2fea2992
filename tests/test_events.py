"""Event processing on PostgreSQL, with Stripe played by the simulator over HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import scheduler
from recovery.inbox import relay
from recovery.models import AuditEntry, Customer, RecoveryCase, WebhookEvent

from .factories import case_of, invoice_object, post_event, sim_post, steps_of, stripe_event


def events_by_type() -> dict[str, str]:
    with session_scope() as session:
        return {row.type: row.status for row in session.scalars(select(WebhookEvent))}


def test_failed_payment_opens_case_with_decline_details_fetched_from_stripe(event_stack):
    scenario = sim_post(
        event_stack.sim.url,
        "/_sim/scenarios/failed_invoice",
        {
            "amount": 4900,
            "currency": "eur",
            "card": {
                "brand": "mastercard",
                "exp_month": 3,
                "exp_year": 2031,
                "fingerprint": "fpMC1",
            },
            "behavior": {
                "decline_code": "insufficient_funds",
                "advice_code": "try_again_later",
                "network_advice_code": "02",
                "network_decline_code": "51",
            },
        },
    )
    assert set(event_stack.drain().values()) == {"processed"}
    case = case_of(scenario["invoice"])
    assert case.status == "open"
    assert (case.amount_due, case.currency, case.attempt_count) == (4900, "eur", 1)
    assert (case.failure_code, case.decline_code, case.advice_code) == (
        "card_declined",
        "insufficient_funds",
        "try_again_later",
    )
    assert (case.network_advice_code, case.network_decline_code, case.outcome_type) == (
        "02",
        "51",
        "issuer_declined",
    )
    assert (case.payment_method_type, case.card_brand, case.card_fingerprint) == (
        "card",
        "mastercard",
        "fpMC1",
    )
    assert (case.card_exp_month, case.card_exp_year) == (3, 2031)
    assert case.charge_id == scenario["charge"]
    assert case.subscription_id == scenario["subscription"]
    assert case.hosted_invoice_url.endswith(scenario["invoice"])
    # Two reads: the invoice as it stands, and its payments with each one's
    # intent and charge expanded.
    reads = [path for method, path, _ in event_stack.sim.state.requests_seen if method == "GET"]
    assert sorted(path.split("/")[2] for path in reads) == ["invoice_payments", "invoices"]
    with session_scope() as session:
        customer = session.scalars(select(Customer)).one()
        assert customer.stripe_customer_id == scenario["customer"]
        assert case.customer_id == customer.id


def test_processing_twice_changes_nothing(event_stack):
    scenario = sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {})
    event_stack.drain()
    with session_scope() as session:
        row = session.scalars(select(WebhookEvent)).one()
        audit_before = len(session.scalars(select(AuditEntry)).all())
    assert scheduler.process_events([row.id], datetime.now(UTC), get_settings())[row.id] is None
    relay.replay([row.id], datetime.now(UTC))
    event_stack.drain()
    with session_scope() as session:
        assert len(session.scalars(select(RecoveryCase)).all()) == 1
        # the replay saw an attempt already recorded: no second case, no new entry
        assert len(session.scalars(select(AuditEntry)).all()) == audit_before
    assert case_of(scenario["invoice"]).attempt_count == 1


def test_paid_then_late_failure_stays_closed(event_stack):
    scenario = sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {})
    failed = next(e for e in event_stack.sim.state.events if e["type"] == "invoice.payment_failed")
    event_stack.drain()
    sim_post(event_stack.sim.url, f"/_sim/customers/{scenario['customer']}/cards", {})
    sim_post(event_stack.sim.url, f"/_sim/invoices/{scenario['invoice']}/attempt")
    event_stack.drain()
    assert case_of(scenario["invoice"]).status == "recovered"
    # Stripe delivers the old failure again, late.
    late = stripe_event("invoice.payment_failed", failed["data"]["object"])
    assert post_event(event_stack.receiver, late)[0] == 200
    event_stack.drain()
    case = case_of(scenario["invoice"])
    assert (case.status, case.amount_recovered) == ("recovered", 2000)


def test_failure_arriving_after_payment_is_recorded_closed(event_stack):
    """Out of order: invoice.paid first (no case yet), then the older failure:
    the case is recorded as paid elsewhere, and nothing is planned or sent."""
    scenario = sim_post(
        event_stack.sim.url,
        "/_sim/invoices",
        {
            "customer": sim_post(event_stack.sim.url, "/_sim/customers", {"card": {}})["id"],
            "amount": 1500,
            "subscription": "auto",
        },
    )
    stale_failure = stripe_event("invoice.payment_failed", dict(scenario, attempt_count=1))
    sim_post(event_stack.sim.url, f"/_sim/invoices/{scenario['id']}/attempt")  # succeeds: paid
    event_stack.drain()
    assert post_event(event_stack.receiver, stale_failure)[0] == 200
    event_stack.drain()
    case = case_of(scenario["id"])
    assert (case.status, case.recovery_path, case.amount_recovered) == (
        "recovered",
        "paid_elsewhere",
        1500,
    )
    assert case.first_failed_at is not None and case.attempt_count == 1
    assert steps_of(case.id) == []
    assert events_by_type()["invoice.payment_failed"] == "processed"


@pytest.mark.parametrize(
    ("action", "status"), [("void", "voided"), ("mark_uncollectible", "uncollectible")]
)
def test_voided_and_uncollectible_close_the_case(event_stack, action, status):
    scenario = sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {})
    event_stack.drain()
    sim_post(event_stack.sim.url, f"/_sim/invoices/{scenario['invoice']}/{action}")
    event_stack.drain()
    case = case_of(scenario["invoice"])
    assert case.status == status and case.closed_at is not None


def test_authentication_required_marks_the_case(event_stack):
    scenario = sim_post(
        event_stack.sim.url,
        "/_sim/scenarios/failed_invoice",
        {"behavior": {"mode": "authenticate"}},
    )
    event_stack.drain()
    case = case_of(scenario["invoice"])
    assert case.needs_authentication and case.decline_code == "authentication_required"
    assert events_by_type()["invoice.payment_action_required"] == "processed"


def test_canceled_subscription_closes_its_case(event_stack):
    from recovery import stripe_api

    scenario = sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {})
    event_stack.drain()
    stripe_api.cancel_subscription(scenario["subscription"], "cancel-test-1")
    event_stack.drain()
    assert case_of(scenario["invoice"]).status == "canceled"


def test_card_change_is_recorded_for_the_engine(event_stack):
    scenario = sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {})
    event_stack.drain()
    new_card = sim_post(event_stack.sim.url, f"/_sim/customers/{scenario['customer']}/cards", {})
    results = event_stack.drain()
    assert set(results.values()) == {"processed"}
    with session_scope() as session:
        customer = session.scalars(select(Customer)).one()
        assert customer.card_updated_at is not None
        assert customer.default_payment_method == new_card["id"]
        actions = [a.action for a in session.scalars(select(AuditEntry))]
        assert actions.count("card_updated") == 2  # payment_method.attached, customer.updated


def test_customer_update_without_card_change_is_ignored(event_stack):
    customer = {"id": "cus_unknown", "object": "customer", "invoice_settings": {}}
    event = stripe_event("customer.updated", customer, previous={"description": "old"})
    post_event(event_stack.receiver, event)
    assert set(event_stack.drain().values()) == {"ignored"}


def test_unknown_types_are_ignored_and_other_mode_events_refused_at_the_door(event_stack):
    post_event(
        event_stack.receiver, stripe_event("plan.created", {"id": "plan_1", "object": "plan"})
    )
    status, answer = post_event(
        event_stack.receiver,
        stripe_event("invoice.payment_failed", invoice_object(), livemode=True),
    )
    assert status == 400 and "live-mode event" in answer["error"]
    assert set(event_stack.drain().values()) == {"ignored"}
    with session_scope() as session:
        assert session.scalars(select(RecoveryCase)).all() == []


def test_events_for_unknown_objects_do_not_crash(event_stack):
    for kind in ("invoice.paid", "invoice.voided", "customer.subscription.deleted"):
        post_event(event_stack.receiver, stripe_event(kind, invoice_object(id="in_nobody")))
    assert set(event_stack.drain().values()) == {"processed"}


def test_stripe_errors_back_off_then_fail_and_can_be_replayed(event_stack):
    scenario = sim_post(event_stack.sim.url, "/_sim/scenarios/failed_invoice", {})
    sim_post(
        event_stack.sim.url,
        "/_sim/faults",
        {"path_prefix": "/v1/invoices", "status": 500, "count": 3},
    )
    event_stack.sim.flush()
    now = datetime.now(UTC)
    assert list(event_stack.drain(now).values()) == ["pending"]
    with session_scope() as session:
        row = session.scalars(select(WebhookEvent)).one()
        assert row.attempts == 1 and "StripeUnavailable" in row.last_error
        assert row.available_at == now + timedelta(seconds=30)
    # Not due yet: nothing is published.
    assert event_stack.drain(now + timedelta(seconds=10)) == {}
    assert list(event_stack.drain(now + timedelta(seconds=31)).values()) == ["pending"]
    assert list(event_stack.drain(now + timedelta(seconds=92)).values()) == [
        "failed"
    ]  # 3rd and last
    assert case_of(scenario["invoice"]) is None
    # The fault is gone: an operator replays and it goes through.
    with session_scope() as session:
        row_id = session.scalars(select(WebhookEvent.id)).one()
    relay.replay([row_id], datetime.now(UTC))
    assert list(event_stack.drain().values()) == ["processed"]
    assert case_of(scenario["invoice"]).status == "open"


def test_a_claim_whose_worker_died_is_taken_again_after_its_lease(event_stack):
    post_event(
        event_stack.receiver, stripe_event("plan.created", {"id": "plan_1", "object": "plan"})
    )
    now = datetime.now(UTC) + timedelta(seconds=1)
    with session_scope() as session:
        row_id = session.scalars(select(WebhookEvent.id)).one()
    assert relay._claim([row_id], now, get_settings()) == {row_id: 1}  # then its worker dies
    assert event_stack.drain(now) == {}
    later = now + relay.LEASE + timedelta(seconds=1)
    assert event_stack.drain(later) == {row_id: "ignored"}


def test_an_error_quoting_a_nul_is_recorded_and_the_event_ends_failed(receiver):
    """Whatever an event holds, it ends: a handler's error naming a NUL byte
    is stored (as the text \\x00) and the event fails after its last attempt."""
    event = stripe_event("invoice.payment_failed", invoice_object())
    assert post_event(receiver, event)[0] == 200
    with session_scope() as session:
        event_id = session.scalars(
            select(WebhookEvent.id).where(WebhookEvent.stripe_event_id == event["id"])
        ).one()

    def poisoned(session, payload, now, settings):
        raise ValueError("field held 'a\x00b'")

    settings = get_settings()
    moment = datetime.now(UTC)
    for _ in range(settings.event_max_attempts):
        moment += timedelta(hours=1)  # past each backoff
        relay.process_event(event_id, moment, settings, poisoned)
    with session_scope() as session:
        row = session.get(WebhookEvent, event_id)
        assert row.status == "failed" and row.attempts == settings.event_max_attempts
        assert "a\\x00b" in row.last_error


def test_one_sweep_hands_out_the_whole_backlog(db):
    """A backlog drains as fast as workers take it: one sweep publishes every
    due event, page after page, not one page per beat."""
    from recovery.inbox.receiver import inbox_row, parse_event

    now = datetime.now(UTC)
    with session_scope() as session:
        for _ in range(125):
            payload = stripe_event("plan.created", {"id": "plan_1", "object": "plan"})
            raw = json.dumps(payload).encode()
            session.add(WebhookEvent(**inbox_row(parse_event(raw), raw, now)))
    messages: list[list[int]] = []
    assert relay.relay(messages.append, now, 10) == 125
    assert len({i for message in messages for i in message}) == 125
    assert max(len(message) for message in messages) <= relay.PUBLISH_CHUNK
    assert relay.relay(messages.append, now, 10) == 0  # published: leased, not due
