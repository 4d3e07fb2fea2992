"""A case is a function of the set of events Stripe sent, not of their order.

The simulator plays an invoice's story (failures with rising attempt counts,
new cards, an authentication request, then maybe payment, voiding or the
subscription's end) and records the events Stripe would send. The handlers
then take those events in Stripe's order and in other orders with
duplicates, each run in a savepoint of one rolled-back transaction, against
the same Stripe state: every run must leave the same case and steps."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select

from recovery import clock
from recovery.engine import cases, events
from recovery.models import CaseStatus, RecoveryAttempt, StepStatus

from .conftest import T0

pytestmark = pytest.mark.services

# After every event of every story: the moment the handlers run at.
NOW = T0 + timedelta(days=6)

DECLINES = [
    {"mode": "decline", "decline_code": "insufficient_funds"},
    {"mode": "decline", "decline_code": "do_not_honor"},
    {"mode": "decline", "decline_code": "expired_card"},
    {"mode": "decline", "decline_code": "fraudulent"},
    {"mode": "authenticate"},
]
ENDINGS = [None, "paid", "void", "mark_uncollectible", "subscription_deleted"]


def control(sim, path: str, body: dict | None = None) -> Any:
    status, answer = sim.control("POST", path, body or {})
    assert status == 200, answer
    return answer


def play(sim, first: dict, later: list[tuple[str, dict | None]], ending: str | None, card_on: str):
    """One invoice's story in the simulator, a day between moves; its events."""
    seen = len(sim.state.events)
    clock.set_now(T0)
    story = control(sim, "/_sim/scenarios/failed_invoice", {"behavior": first, "card_on": card_on})
    invoice_id, declining = story["invoice"], story["payment_method"]
    moment = T0
    for move, behavior in later:
        moment += timedelta(days=1)
        clock.set_now(moment)
        if move == "new_card":
            control(sim, f"/_sim/customers/{story['customer']}/cards", {"behavior": behavior})
        else:
            control(sim, f"/_sim/payment_methods/{declining}/behavior", behavior)
            control(sim, f"/_sim/invoices/{invoice_id}/attempt")
    clock.set_now(moment + timedelta(hours=1))
    if ending == "paid":
        charged = sim.default_payment_method(sim.get("invoice", invoice_id))["id"]
        control(sim, f"/_sim/payment_methods/{charged}/behavior", {"mode": "succeed"})
        control(sim, f"/_sim/invoices/{invoice_id}/attempt")
    elif ending in ("void", "mark_uncollectible"):
        control(sim, f"/_sim/invoices/{invoice_id}/{ending}")
    elif ending == "subscription_deleted":
        status, answer = sim.api("DELETE", f"/v1/subscriptions/{story['subscription']}", {})
        assert status == 200, answer
    clock.set_now(None)
    return invoice_id, sim.state.events[seen:]


def outcome(session, invoice_id: str) -> tuple:
    """What the events decided: the case's facts and its live steps."""
    case = cases.for_invoice(session, invoice_id)
    if case is None:
        return ()
    live = session.scalars(
        select(RecoveryAttempt).where(
            RecoveryAttempt.case_id == case.id, RecoveryAttempt.status == StepStatus.SCHEDULED
        )
    ).all()
    return (
        case.status,
        case.recovery_path,
        case.amount_recovered,
        case.first_failed_at,
        case.first_decline_code,
        case.first_category,
        case.last_failure_at,
        case.attempt_count,
        case.decline_code,
        case.card_fingerprint,
        case.category,
        case.mode,
        case.needs_authentication,
        case.flag_reason,
        sorted((s.step, s.kind, s.origin, s.due_at) for s in live),
    )


def run(session, settings, invoice_id: str, stream: list[dict]) -> tuple:
    """The handlers over `stream` in a savepoint that is then undone."""
    savepoint = session.begin_nested()
    try:
        for event in stream:
            with session.begin_nested():
                events.handle_event(session, event, NOW, settings)
        return outcome(session, invoice_id)
    finally:
        savepoint.rollback()
        session.expire_all()


moves = st.lists(
    st.tuples(st.sampled_from(["attempt", "new_card"]), st.sampled_from(DECLINES)),
    max_size=3,
)


@hypothesis_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.sampled_from(DECLINES),
    later=moves,
    ending=st.sampled_from(ENDINGS),
    card_on=st.sampled_from(["customer", "subscription"]),
    data=st.data(),
)
def test_any_order_with_duplicates_ends_in_the_same_case(
    sim, session, settings, first, later, ending, card_on, data
):
    invoice_id, stream = play(sim, first, later, ending, card_on)
    assert any(e["type"] == "invoice.payment_failed" for e in stream)
    in_order = run(session, settings, invoice_id, stream)
    assert in_order, "the failure opened no case"
    shuffled = list(data.draw(st.permutations(stream), label="order"))
    for again in data.draw(st.lists(st.sampled_from(stream), max_size=4), label="duplicates"):
        shuffled.insert(data.draw(st.integers(0, len(shuffled)), label="at"), again)
    assert run(session, settings, invoice_id, shuffled) == in_order


def test_a_subscription_deleted_before_its_failure_arrives_closes_the_case(sim, session, settings):
    invoice_id, stream = play(sim, DECLINES[0], [], "subscription_deleted", "customer")
    deleted = [e for e in stream if e["type"] == "customer.subscription.deleted"]
    assert deleted
    rest = [e for e in stream if e not in deleted]
    facts = run(session, settings, invoice_id, deleted + rest)
    status, steps = facts[0], facts[-1]
    assert status is CaseStatus.CANCELED
    assert steps == []


def test_a_failure_replayed_after_voiding_is_recorded_voided(sim, session, settings):
    invoice_id, stream = play(sim, DECLINES[1], [], "void", "customer")
    failures = [e for e in stream if e["type"] == "invoice.payment_failed"]
    facts = run(session, settings, invoice_id, failures)
    assert facts[0] is CaseStatus.VOIDED and facts[4] == "do_not_honor" and facts[-1] == []
