"""Operator commands on a real case: listings, refusals, forced retries, audit."""

from __future__ import annotations

import json
from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import select

from recovery.cli import cli
from recovery.db import session_scope
from recovery.models import AuditEntry

from .conftest import T0


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_unknown_case_is_a_clear_error(db):
    for args in (("cases", "show", "999"), ("retry", "in_nope"), ("pause", "7", "--reason", "x")):
        result = run(*args)
        assert result.exit_code == 1 and "no case" in result.output


def test_listing_and_timeline(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    listed = json.loads(run("cases", "list", "--json", "--status", "open").output)
    assert [c["invoice"] for c in listed] == [scenario["invoice"]]
    shown = json.loads(run("cases", "show", scenario["invoice"], "--json").output)
    assert shown["category"] == "funds"
    scheduled = [s for s in shown["steps"] if s["status"] == "scheduled"]
    assert scheduled and all(s["why"] for s in scheduled)
    final = next(s for s in scheduled if s["step"] == "final")
    assert final["why"] == "plan funds: cancel_subscription when its 33-day window ends"
    retry = next(s for s in shown["steps"] if s["step"] == "retry:1")
    # Why it is due then: the learner (on by default) or the plan, in words.
    assert retry["why"].startswith(("learned: ", "plan funds, try 1 of 8"))
    assert any(item["what"] == "classified" for item in shown["timeline"])
    text = run("cases", "show", str(listed[0]["id"])).output
    assert "timeline:" in text and "why: " in text


def test_retry_refuses_a_dead_card_unless_forced_with_a_reason(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "stolen_card"})
    stack.tick()
    refused = run("retry", scenario["invoice"])
    assert refused.exit_code == 1 and "refused" in refused.output and "dead_card" in refused.output
    assert run("retry", scenario["invoice"], "--force").exit_code == 2  # no reason
    dry = run("retry", scenario["invoice"], "--dry-run", "--force", "--reason", "asked")
    assert dry.exit_code == 0 and "would retry" in dry.output
    forced = run("retry", scenario["invoice"], "--force", "--reason", "customer called")
    assert forced.exit_code == 0 and "declined" in forced.output
    with session_scope() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "retry")).one()
    assert entry.actor.startswith("operator:") and entry.detail["reason"] == "customer called"
    assert entry.detail["forced"] is True


def test_pause_stops_the_plan_and_resume_plans_again(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    paused = run("pause", scenario["invoice"], "--reason", "dispute")
    assert paused.exit_code == 0 and paused.output.splitlines()[-1] == "case 1: paused"
    again = run("pause", scenario["invoice"], "--reason", "dispute")
    assert again.exit_code == 1 and "already paused" in again.output
    result = stack.tick(T0 + timedelta(days=2))
    assert result.outcomes.get("declined") is None
    resumed = run("resume", scenario["invoice"], "--reason", "settled")
    assert resumed.exit_code == 0 and resumed.output.splitlines()[-1] == "case 1: resumed"
    shown = json.loads(run("cases", "show", scenario["invoice"], "--json").output)
    assert shown["next_step"] is not None and not shown["paused"]
    canceled = run("cancel", scenario["invoice"], "--reason", "refunded")
    assert canceled.exit_code == 0 and canceled.output.splitlines()[-1] == "case 1: canceled"
    assert json.loads(run("cases", "show", scenario["invoice"], "--json").output)["status"] == (
        "canceled"
    )


def test_classify_list_is_readable(db):
    output = run("classify", "--list").output
    assert "insufficient_funds" in output and "visa network_decline_code" in output
    rows = json.loads(run("classify", "--list", "--json").output)
    assert {"signal", "code", "category", "min_wait", "why"} == set(rows[0])


def test_bad_instants_are_usage_errors_that_change_nothing(db):
    from recovery.models import RecoveryAttempt

    bad_tick = run("tick", "--now", "next tuesday", "--sync")
    assert bad_tick.exit_code == 2 and "not an ISO 8601 instant" in bad_tick.output
    bad_since = run("cases", "list", "--since", "yesterday")
    assert bad_since.exit_code == 2 and "not an ISO 8601 instant" in bad_since.output
    with session_scope() as session:
        assert session.scalars(select(AuditEntry)).all() == []
        assert session.scalars(select(RecoveryAttempt)).all() == []
