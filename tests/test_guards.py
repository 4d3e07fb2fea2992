"""Nothing happens to a case that may not act: work already queued or claimed
when an operator pauses (or the case closes) asks engine/cases.py first and
does nothing. Real PostgreSQL, a real SMTP server, Stripe played by the
simulator over HTTP."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recovery.config import get_settings
from recovery.customers import delivery, outbox
from recovery.db import session_scope
from recovery.engine import cases, scheduler, steps
from recovery.models import Message, MessageStatus, StepOutcome

from .conftest import T0
from .factories import make_case, make_message, the_case

pytestmark = pytest.mark.services

LEASE = timedelta(minutes=5)


def pause(case_id: int) -> None:
    with session_scope() as session:
        cases.pause(session, cases.locked(session, case_id), T0, "operator:test", "disputed")


def test_an_email_queued_before_a_pause_is_not_sent(db, smtp_sink):
    with session_scope() as session:
        case = make_case(session)
        message_id = make_message(session, case).id
        case_id = case.id
    pause(case_id)

    ids = outbox.claim(T0, 10)
    assert ids == [message_id]
    assert delivery.send_all(ids, T0, get_settings()) == {message_id: MessageStatus.SKIPPED}
    assert smtp_sink.messages == []
    with session_scope() as session:
        message = session.get(Message, message_id)
        assert (message.status, message.last_error) == (MessageStatus.SKIPPED, "case paused")


def test_an_email_of_an_open_case_is_sent(db, smtp_sink):
    """The same row as above, unpaused: the guard is what stopped it."""
    with session_scope() as session:
        message_id = make_message(session, make_case(session)).id
    ids = outbox.claim(T0, 10)
    assert delivery.send_all(ids, T0, get_settings()) == {message_id: MessageStatus.SENT}
    assert len(smtp_sink.messages) == 1


def test_a_final_action_claimed_before_a_pause_does_not_run(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    case = the_case(scenario["invoice"])
    claim = steps.claim_named(case.id, steps.FINAL, T0, LEASE)
    assert claim is not None
    pause(case.id)

    assert scheduler.execute(claim, T0, get_settings()) == StepOutcome.SKIPPED_PAUSED
    assert stack.sim.state.objects[scenario["subscription"]]["status"] != "canceled"
    assert the_case(scenario["invoice"]).status == "open"


def test_a_final_action_claimed_before_a_close_does_not_run(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    case = the_case(scenario["invoice"])
    claim = steps.claim_named(case.id, steps.FINAL, T0, LEASE)
    with session_scope() as session:
        cases.cancel(session, cases.locked(session, case.id), T0, "operator:test", "refunded")

    assert scheduler.execute(claim, T0, get_settings()) == StepOutcome.SKIPPED_CLOSED
    assert stack.sim.state.objects[scenario["subscription"]]["status"] != "canceled"


def test_a_retry_claimed_before_a_pause_charges_nothing(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    case = the_case(scenario["invoice"])
    claim = steps.claim_named(case.id, steps.plan_retry_name(1), T0, LEASE)
    assert claim is not None
    pause(case.id)

    assert scheduler.execute(claim, T0, get_settings()) == StepOutcome.SKIPPED_PAUSED
    assert stack.charges(scenario["invoice"]) == []
