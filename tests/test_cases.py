"""The case state machine (engine/cases.py) on PostgreSQL, without the HTTP
stack: each test builds its rows in a transaction rolled back afterwards."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from recovery import stripe_api
from recovery.engine import cases, planner
from recovery.models import (
    AuditEntry,
    CaseStatus,
    Customer,
    LinkPurpose,
    LinkRevoked,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryLink,
    StepKind,
    StepOrigin,
    StepOutcome,
    StepStatus,
)

from .conftest import T0
from .factories import make_case, make_message, make_step

pytestmark = pytest.mark.services

OPEN, R, C, V, U = (
    CaseStatus.OPEN,
    CaseStatus.RECOVERED,
    CaseStatus.CANCELED,
    CaseStatus.VOIDED,
    CaseStatus.UNCOLLECTIBLE,
)
# Written out here, apart from the code's table, so that a change to either
# shows: Stripe lets an uncollectible invoice, or a canceled subscription's
# invoice, still be paid or voided, and the latter written off; a paid or
# voided invoice is final. The moves form a lattice: any order of the same
# closing events ends in the same state.
ALLOWED = {
    (OPEN, R), (OPEN, C), (OPEN, V), (OPEN, U),
    (C, U), (C, R), (C, V),
    (U, R), (U, V),
}  # fmt: skip


def actions(session, case) -> list[str]:
    return list(
        session.scalars(
            select(AuditEntry.action).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id)
        )
    )


def steps_of(session, case) -> list[RecoveryAttempt]:
    session.expire_all()
    return list(
        session.scalars(
            select(RecoveryAttempt)
            .where(RecoveryAttempt.case_id == case.id)
            .order_by(RecoveryAttempt.id)
        )
    )


@pytest.mark.parametrize("current", list(CaseStatus))
@pytest.mark.parametrize("target", [R, C, V, U])
def test_a_case_moves_only_where_its_state_allows(session, current, target):
    case = make_case(session, status=current)
    moved = cases.close(session, case, target, T0 + timedelta(days=1))
    assert moved == ((current, target) in ALLOWED)
    assert case.status is (target if moved else current)


@pytest.mark.parametrize("late", [C, V, U])
def test_a_recovered_case_stays_recovered(session, late):
    case = make_case(session)
    assert cases.close(session, case, R, T0, amount_recovered=2000)
    assert not cases.close(session, case, late, T0 + timedelta(hours=1))
    assert (case.status, case.amount_recovered, case.closed_at) == (R, 2000, T0)


def test_closing_cancels_steps_revokes_links_and_thanks_a_reminded_customer(session):
    case = make_case(session)
    retry = make_step(session, case, StepKind.RETRY)
    make_message(session, case, status=MessageStatus.SENT)
    session.add(
        RecoveryLink(
            case_id=case.id,
            token_hash="a" * 64,
            purpose=LinkPurpose.UPDATE_CARD,
            expires_at=T0 + timedelta(days=14),
            click_count=0,
            created_at=T0,
        )
    )
    session.flush()

    assert cases.close(session, case, R, T0 + timedelta(days=2))
    session.expire_all()
    assert session.get(RecoveryAttempt, retry.id).status is StepStatus.CANCELED
    link = session.scalars(select(RecoveryLink).where(RecoveryLink.case_id == case.id)).one()
    assert link.revoked_reason is LinkRevoked.CLOSED
    thanks = session.scalars(
        select(Message).where(Message.case_id == case.id, Message.template == "recovered")
    ).all()
    assert len(thanks) == 1
    assert actions(session, case)[-1] == "case_recovered"


def test_a_customer_never_reminded_is_not_thanked(session):
    case = make_case(session)
    cases.close(session, case, R, T0)
    assert session.scalars(select(Message).where(Message.case_id == case.id)).all() == []


@pytest.mark.parametrize(
    ("status", "paused", "expected"),
    [
        (OPEN, False, True),
        (OPEN, True, False),
        (R, False, False),
        (C, False, False),
        (V, False, False),
        (U, False, False),
    ],
)
def test_only_an_open_unpaused_case_may_act(session, status, paused, expected):
    case = make_case(session, status=status, paused_at=T0 if paused else None)
    assert cases.may_act(case) is expected
    assert (cases.idle_outcome(case) is None) is expected


# -- failures ------------------------------------------------------------------------


def report(at, attempt: int = 2, **fields) -> cases.FailureReport:
    return cases.FailureReport(
        event_id="evt_test",
        created=at,
        attempt_count=attempt,
        next_payment_attempt=None,
        hosted_invoice_url=None,
        amount_due=None,
        **fields,
    )


def unfailed_case(session):
    """A case just opened: no failure recorded on it yet."""
    return make_case(
        session,
        category=None,
        mode=None,
        first_category=None,
        attempt_count=0,
        first_failed_at=None,
        last_failure_at=None,
        decline_code=None,
    )


def never_read() -> stripe_api.DeclineDetails:
    raise AssertionError("Stripe was asked for a decline that changes nothing")


def test_a_late_stale_failure_changes_nothing_but_the_card_ledger(session, settings):
    # Attempt 2 failed on day 3; attempt 1 of day 1 arrives late, after the
    # earliest failure (day 0) is known: it neither anchors nor is current,
    # but the networks count its charge.
    case = make_case(session, attempt_count=2, last_failure_at=T0 + timedelta(days=3))
    before = (case.decline_code, case.last_failure_at, case.attempt_count, case.first_failed_at)
    late = stripe_api.DeclineDetails(
        decline_code="do_not_honor", charge_id="ch_late", card_fingerprint=case.card_fingerprint
    )
    verdict = cases.record_failure(
        session, case, report(T0 + timedelta(days=1), attempt=1), lambda: late, T0, settings
    )
    assert verdict is cases.Verdict.STALE
    after = (case.decline_code, case.last_failure_at, case.attempt_count, case.first_failed_at)
    assert after == before
    assert planner.card_history(session, case.card_fingerprint)[0] == [T0 + timedelta(days=1)]


def test_the_earliest_failure_anchors_the_plan_whatever_arrives_first(session, settings):
    later = stripe_api.DeclineDetails(decline_code="do_not_honor", card_brand="visa")
    earliest = stripe_api.DeclineDetails(decline_code="insufficient_funds", card_brand="visa")
    case = unfailed_case(session)
    cases.record_failure(
        session, case, report(T0 + timedelta(days=3), attempt=2), lambda: later, T0, settings
    )
    shifted = {s.step: s.due_at for s in steps_of(session, case) if s.kind is StepKind.FINAL}
    verdict = cases.record_failure(
        session, case, report(T0, attempt=1), lambda: earliest, T0, settings
    )
    assert verdict is cases.Verdict.RECORDED
    assert case.first_failed_at == T0 and case.first_decline_code == "insufficient_funds"
    # the newest attempt still names the current decline
    assert case.last_failure_at == T0 + timedelta(days=3) and case.attempt_count == 2
    assert case.decline_code == "do_not_honor"
    finals = [s for s in steps_of(session, case) if s.kind is StepKind.FINAL]
    live = [s for s in finals if s.status is StepStatus.SCHEDULED]
    assert len(live) == 1 and live[0].due_at < max(shifted.values())


def test_a_failure_on_a_closed_case_is_recorded_but_plans_nothing(session, settings):
    case = make_case(session, status=R)
    details = stripe_api.DeclineDetails(decline_code="do_not_honor")
    verdict = cases.record_failure(
        session, case, report(T0 + timedelta(days=1), attempt=3), lambda: details, T0, settings
    )
    assert verdict is cases.Verdict.RECORDED
    assert case.status is R and case.attempt_count == 3
    assert steps_of(session, case) == []


def test_a_failure_already_recorded_is_not_read_again(session, settings):
    case = make_case(session, attempt_count=2)
    verdict = cases.record_failure(
        session, case, report(T0 + timedelta(hours=1), attempt=2), never_read, T0, settings
    )
    assert verdict is cases.Verdict.ALREADY_RECORDED


def test_a_new_failure_is_recorded_and_planned(session, settings):
    case = unfailed_case(session)
    details = stripe_api.DeclineDetails(decline_code="insufficient_funds", card_brand="visa")
    verdict = cases.record_failure(
        session, case, report(T0, attempt=1), lambda: details, T0, settings
    )
    assert verdict is cases.Verdict.RECORDED
    assert (case.category, case.first_category, case.first_decline_code) == (
        "funds",
        "funds",
        "insufficient_funds",
    )
    planned = {(s.kind, s.origin, s.number) for s in steps_of(session, case)}
    assert (StepKind.RETRY, StepOrigin.PLAN, 1) in planned
    assert (StepKind.EMAIL, StepOrigin.PLAN, 0) in planned
    assert (StepKind.FINAL, StepOrigin.PLAN, None) in planned


def test_a_failure_on_a_paused_case_is_recorded_but_plans_nothing(session, settings):
    case = make_case(session, paused_at=T0, attempt_count=1)
    details = stripe_api.DeclineDetails(decline_code="do_not_honor")
    verdict = cases.record_failure(
        session, case, report(T0 + timedelta(days=1), attempt=2), lambda: details, T0, settings
    )
    assert verdict is cases.Verdict.RECORDED and case.decline_code == "do_not_honor"
    assert steps_of(session, case) == []


# -- operators ---------------------------------------------------------------------------


def test_pause_cancels_what_was_scheduled_and_a_new_card_changes_nothing(session, settings):
    case = make_case(session)
    make_step(session, case, StepKind.RETRY)
    make_step(session, case, StepKind.EMAIL, template="payment_failed")
    cases.pause(session, case, T0, "operator:test", "disputed")
    assert {s.status for s in steps_of(session, case)} == {StepStatus.CANCELED}
    assert not cases.card_updated(session, case, T0 + timedelta(hours=1), settings)
    assert all(s.status is StepStatus.CANCELED for s in steps_of(session, case))
    with pytest.raises(cases.CaseRefused, match="already paused"):
        cases.pause(session, case, T0, "operator:test", "again")


def test_resume_plans_again_from_now(session, settings):
    case = make_case(session, paused_at=T0)
    cases.resume(session, case, T0 + timedelta(days=1), "operator:test", "resolved", settings)
    assert case.paused_at is None
    live = [s for s in steps_of(session, case) if s.status is StepStatus.SCHEDULED]
    assert {s.kind for s in live} == {StepKind.RETRY, StepKind.EMAIL, StepKind.FINAL}
    assert all(s.due_at >= T0 + timedelta(days=1) for s in live if s.kind is StepKind.RETRY)
    with pytest.raises(cases.CaseRefused, match="not paused"):
        cases.resume(session, case, T0, "operator:test", "twice", settings)


def test_cancel_closes_the_case_and_is_refused_on_a_closed_one(session):
    case = make_case(session)
    cases.cancel(session, case, T0, "operator:test", "refunded")
    assert case.status is C
    assert actions(session, case)[-2:] == ["case_canceled", "cancel"]
    with pytest.raises(cases.CaseRefused, match="is canceled"):
        cases.cancel(session, case, T0, "operator:test", "twice")


def card_update_retries(session, case) -> list[tuple[StepOrigin, object]]:
    return [
        (s.origin, s.due_at)
        for s in steps_of(session, case)
        if s.status is StepStatus.SCHEDULED and s.kind is StepKind.RETRY
    ]


# (saved through our link, the customer's new default): whether the card a
# card update's retry charges is known to be another than the declined one.
@pytest.mark.parametrize(
    "saved, default, another",
    [
        (None, None, False),  # a change that named no card: maybe the declined one, updated
        (None, "pm_declined", False),
        ("pm_declined", None, False),
        ("pm_new", None, True),
        (None, "pm_new", True),
        ("pm_new", "pm_declined", True),  # our link's card is the one charged
    ],
)
def test_another_card_is_charged_at_once_and_the_declined_one_after_the_gap(
    session, settings, saved, default, another
):
    case = make_case(session, last_failure_at=T0, payment_method_id="pm_declined")
    customer = session.get(Customer, case.customer_id)
    customer.card_updated_at = T0 + timedelta(seconds=30)
    customer.saved_payment_method, customer.default_payment_method = saved, default
    make_step(session, case, StepKind.RETRY, due_at=T0 + timedelta(days=3))
    now = T0 + timedelta(minutes=1)
    assert cases.card_updated(session, case, now, settings)
    gap = timedelta(seconds=settings.card_update_min_gap_seconds)
    assert card_update_retries(session, case) == [
        (StepOrigin.CARD_UPDATE, now if another else T0 + gap)
    ]


def test_an_operator_retry_is_refused_where_the_rules_forbid_it(session, settings):
    case = make_case(session, decline_code="expired_card", category="customer_action")
    with pytest.raises(cases.CaseRefused, match="customer_action"):
        cases.request_retry(session, case, T0, "operator:test", None, False, settings)
    request = cases.request_retry(
        session, case, T0, "operator:test", "asked on the phone", True, settings
    )
    [step] = steps_of(session, case)
    assert step.step == request.step
    assert (step.origin, step.forced, step.due_at) == (StepOrigin.OPERATOR, True, T0)


def test_an_operator_retry_on_a_paused_case_is_refused(session, settings):
    case = make_case(session, paused_at=T0)
    with pytest.raises(cases.CaseRefused, match="paused"):
        cases.request_retry(session, case, T0, "operator:test", "now", True, settings)
    assert steps_of(session, case) == []


def test_a_dry_run_schedules_nothing(session, settings):
    case = make_case(session)
    request = cases.request_retry(
        session, case, T0 + timedelta(hours=1), "operator:test", None, False, settings, dry_run=True
    )
    assert request == cases.RetryRequest((), None)
    assert steps_of(session, case) == []


def test_an_operator_retry_moments_after_a_decline_is_refused(session, settings):
    case = make_case(session, last_failure_at=T0)
    with pytest.raises(cases.CaseRefused, match="moments ago"):
        cases.request_retry(session, case, T0 + timedelta(seconds=20), "op", None, False, settings)


def test_an_operator_retry_the_networks_deferred_is_replaced_not_joined(session, settings):
    """Deferred by a network limit, an operator's retry is due hours later:
    a new request (forced, say) makes its own instead of joining it."""
    case = make_case(session)
    now = T0 + timedelta(hours=1)
    deferred = make_step(session, case, name="retry:manual:1", due_at=now + timedelta(hours=5))
    deferred.origin = StepOrigin.OPERATOR
    session.flush()
    request = cases.request_retry(session, case, now, "op", "asked", True, settings)
    assert not request.joined and request.step != deferred.step
    retries = {s.step: s.status for s in steps_of(session, case) if s.kind is StepKind.RETRY}
    assert retries == {deferred.step: StepStatus.CANCELED, request.step: StepStatus.SCHEDULED}


def test_operator_retries_join_the_one_in_flight(session, settings):
    case = make_case(session)
    later = T0 + timedelta(hours=1)
    first = cases.request_retry(session, case, later, "operator:a", None, False, settings)
    again = cases.request_retry(
        session, case, later + timedelta(seconds=3), "b", None, False, settings
    )
    assert (again.step, again.joined) == (first.step, True)
    # One who read the clock a moment before the first, then waited for the
    # case, joins it too rather than replacing it.
    earlier = cases.request_retry(
        session, case, later - timedelta(seconds=1), "d", None, False, settings
    )
    assert (earlier.step, earlier.joined) == (first.step, True)
    session.execute(
        update(RecoveryAttempt)
        .where(RecoveryAttempt.step == first.step)
        .values(status=StepStatus.EXECUTING)
    )
    third = cases.request_retry(
        session, case, later + timedelta(minutes=1), "c", None, False, settings
    )
    assert (third.step, third.joined) == (first.step, True)
    assert [s.step for s in steps_of(session, case) if s.kind is StepKind.RETRY] == [first.step]


def _until_the_operator_waits(database: str, operator: threading.Thread) -> None:
    from recovery.db import get_engine

    if database == "sqlite":
        time.sleep(0.5)  # SQLite does not say who waits for its lock
        return
    with get_engine().connect() as watch:
        # Each look outside a transaction: within one, PostgreSQL shows the
        # same snapshot of pg_stat_activity on every read.
        watch.execution_options(isolation_level="AUTOCOMMIT")
        waiting = (
            "select count(*) from pg_stat_activity"
            " where wait_event_type = 'Lock' and datname = current_database()"
        )
        # Until the operator waits or is done without waiting; the deadline
        # only bounds a hang, a loaded machine may take seconds to get there.
        deadline = time.monotonic() + 60
        while operator.is_alive() and time.monotonic() < deadline:
            if watch.execute(text(waiting)).scalar():
                return
            time.sleep(0.01)
    pytest.fail("the operator's cancel never waited on the worker's claim")


@pytest.mark.parametrize("database", ["db", "sqlite"])
def test_an_operator_retry_joins_a_plan_retry_a_worker_claims_while_it_cancels(
    database, settings, request
):
    """The worker's clock is a second ahead of the operator's: to the
    operator the plan's retry is not yet due, while the worker claims it.
    The claim holds the step's row (PostgreSQL) or the database (SQLite)
    until it commits; the operator's cancel waits for it, finds the step
    claimed, and joins it."""
    from recovery.db import get_engine, session_scope
    from recovery.models import RecoveryCase

    request.getfixturevalue(database)
    now = T0 + timedelta(hours=1)
    with session_scope() as session:
        case = make_case(session)
        step = make_step(session, case, due_at=now + timedelta(seconds=1))
        case_id, step_id, plan_step = case.id, step.id, step.step

    worker = get_engine().connect()
    claiming = worker.begin()
    worker.execute(
        update(RecoveryAttempt)
        .where(RecoveryAttempt.id == step_id)
        .values(status=StepStatus.CLAIMED, claims=1)
    )
    answers: list[cases.RetryRequest] = []

    def operator() -> None:
        with session_scope() as session:
            held = session.get(RecoveryCase, case_id, with_for_update=True)
            answers.append(cases.request_retry(session, held, now, "op", None, False, settings))

    asking = threading.Thread(target=operator)
    asking.start()
    _until_the_operator_waits(database, asking)
    claiming.commit()
    worker.close()
    asking.join(timeout=30)

    assert [(a.step, a.joined) for a in answers] == [(plan_step, True)]
    with session_scope() as session:
        held = session.get(RecoveryCase, case_id)
        assert [(s.step, s.status) for s in steps_of(session, held)] == [
            (plan_step, StepStatus.CLAIMED)
        ]


def test_closed_steps_outcomes_are_told_apart(session):
    paused = make_case(session, paused_at=T0)
    closed = make_case(session, status=V)
    assert cases.idle_outcome(paused) is StepOutcome.SKIPPED_PAUSED
    assert cases.idle_outcome(closed) is StepOutcome.SKIPPED_CLOSED


def test_no_closed_case_moves_back_to_open_and_recovered_or_voided_is_final():
    from recovery.engine.cases import CASE_NEXT, can_move
    from recovery.models import CaseStatus

    closed = [status for status in CaseStatus if status is not CaseStatus.OPEN]
    assert set(CASE_NEXT) == set(CaseStatus)
    for status in closed:
        assert not can_move(status, CaseStatus.OPEN), status
        assert not can_move(status, status), status
    assert CASE_NEXT[CaseStatus.RECOVERED] == CASE_NEXT[CaseStatus.VOIDED] == frozenset()
    # A late failure event is the only thing that could try: it adds facts,
    # never a state (test_order.py), and close() refuses the move.
    assert not can_move(CaseStatus.UNCOLLECTIBLE, CaseStatus.CANCELED)
