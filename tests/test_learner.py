"""The retry learner: its slots, its draws, and the planner following it (or not)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from recovery.engine import cases, learner, planner, plans
from recovery.engine.classify import Category
from recovery.models import RecoveryAttempt, StepKind, StepOutcome, StepStatus

from .factories import make_case

UTC_ZONE = plans.zone(None)
ANCHOR = datetime(2026, 11, 2, 15, tzinfo=UTC)  # a Monday afternoon
PLAN = datetime(2026, 11, 6, 9, 5, tzinfo=UTC)  # the plan's try 1: Friday's payday morning


def test_a_slot_names_the_category_the_wait_the_payday_and_the_part_of_day():
    assert learner.slot_of("funds", ANCHOR, PLAN, UTC_ZONE, ANCHOR) == "funds/d3-7/p0/fresh/morning"
    saturday_evening = datetime(2026, 11, 7, 19, tzinfo=UTC)
    assert (
        learner.slot_of("funds", ANCHOR, saturday_evening, UTC_ZONE, ANCHOR)
        == "funds/d3-7/p1/fresh/evening"
    )
    wednesday = datetime(2026, 11, 25, 3, tzinfo=UTC)  # five days after Friday the 20th
    assert (
        learner.slot_of("retry", ANCHOR, wednesday, UTC_ZONE, ANCHOR)
        == "retry/d21+/p3+/fresh/night"
    )
    # The same instant is another part of the day in another zone.
    tokyo = plans.zone("Asia/Tokyo")
    assert learner.slot_of("funds", ANCHOR, PLAN, tokyo, ANCHOR).endswith("/evening")


def test_a_slot_tells_a_first_try_on_a_paydays_money_from_another():
    # Declined on Friday's payday morning: Saturday's try is on the same money.
    declined_friday = datetime(2026, 11, 6, 9, 5, tzinfo=UTC)
    saturday = datetime(2026, 11, 7, 9, tzinfo=UTC)
    assert learner.slot_of("funds", ANCHOR, saturday, UTC_ZONE, declined_friday).endswith(
        "/p1/again/morning"
    )
    # Declined on Thursday, the day before: Saturday's try is on new money.
    declined_thursday = declined_friday - timedelta(days=1)
    assert learner.slot_of("funds", ANCHOR, saturday, UTC_ZONE, declined_thursday).endswith(
        "/p1/fresh/morning"
    )
    # The customer's own calendar decides: Thursday 20:00 UTC is Friday in Tokyo.
    tokyo = plans.zone("Asia/Tokyo")
    thursday_evening = datetime(2026, 11, 5, 20, tzinfo=UTC)
    assert "/p1/again/" in learner.slot_of("funds", ANCHOR, saturday, tokyo, thursday_evening)
    assert "/p1/fresh/" in learner.slot_of("funds", ANCHOR, saturday, UTC_ZONE, thursday_evening)


def _choose(counts, seed, earliest=ANCHOR + timedelta(hours=20)):
    return learner.choose(
        "funds", ANCHOR, PLAN, earliest, WINDOW_END, 7, UTC_ZONE, ANCHOR, counts,
        random.Random(seed),
    )  # fmt: skip


def test_candidates_lie_between_the_earliest_moment_and_the_last():
    earliest = ANCHOR + timedelta(hours=20)
    found = learner.candidates(PLAN, earliest, PLAN + learner.LATER_BY, UTC_ZONE)
    assert PLAN in found and found == sorted(found)
    assert min(found) >= earliest and max(found) == datetime(2026, 11, 8, 9, tzinfo=UTC)
    # Never past the last moment, even when the plan's own would allow it.
    assert max(learner.candidates(PLAN, earliest, PLAN, UTC_ZONE)) == PLAN
    assert (
        learner.candidates(PLAN, PLAN + timedelta(days=5), PLAN + timedelta(days=4), UTC_ZONE) == []
    )


WINDOW_END = ANCHOR + timedelta(days=28)


def test_a_plan_of_paydays_moves_a_retry_at_most_a_little_past_its_payday():
    assert learner.last_moment(learner.Axis.PAYDAY, PLAN, WINDOW_END, 7) == PLAN + learner.LATER_BY
    assert learner.last_moment(learner.Axis.PAYDAY, PLAN, PLAN, 0) == PLAN  # nor past the window


def test_a_plan_of_offsets_may_spend_a_try_late_leaving_room_for_its_later_tries():
    gap = learner.MIN_GAP
    assert learner.last_moment(learner.Axis.TIME, PLAN, WINDOW_END, 7) == WINDOW_END - 7 * gap
    assert learner.last_moment(learner.Axis.TIME, PLAN, WINDOW_END, 0) == WINDOW_END
    # No room left late: as far as a plan of paydays may go, no further.
    late_plan = WINDOW_END - timedelta(days=3)
    assert learner.last_moment(learner.Axis.TIME, late_plan, WINDOW_END, 7) == (
        late_plan + learner.LATER_BY
    )


def test_on_the_time_axis_a_family_is_a_span_of_days_since_the_failure():
    monday, friday = "retry_capped/d14-21/p3+/again/morning", "retry_capped/d14-21/p0/fresh/evening"
    assert learner.family_of(monday, learner.Axis.TIME) == "retry_capped/d14-21"
    assert learner.family_of(friday, learner.Axis.TIME) == "retry_capped/d14-21"
    assert learner.family_of(friday) == "retry_capped/p0/fresh"  # the payday axis, by default
    counts = {
        monday: learner.Counts(1, 9),
        friday: learner.Counts(2, 8),
        "retry_capped/d21+/p0/fresh/morning": learner.Counts(5, 5),
    }
    assert learner.families(counts, learner.Axis.TIME) == {
        "retry_capped/d14-21": learner.Counts(3, 17),
        "retry_capped/d21+": learner.Counts(5, 5),
    }


def _opaque(counts, seed, tries_after=7):
    """Try 1 of an opaque decline's plan, due on PLAN, with `tries_after` more."""
    return learner.choose(
        "retry_capped", ANCHOR, PLAN, ANCHOR + timedelta(hours=20), WINDOW_END, tries_after,
        UTC_ZONE, ANCHOR, counts, random.Random(seed), learner.Axis.TIME,
    )  # fmt: skip


def _paid_late(in_100: int) -> dict[str, learner.Counts]:
    """Retries from day 21 on have paid `in_100` in 100, the earlier ones
    hardly ever, over a thousand outcomes each."""
    early = ("d0-1/p3+/again", "d1-3/p3+/again", "d3-7/p0/fresh", "d7-14/p3+/again")
    return {
        "retry_capped/d21+/p3+/again/morning": learner.Counts(in_100 * 10, 1000 - in_100 * 10),
        "retry_capped/d14-21/p3+/again/morning": learner.Counts(50, 950),
    } | {f"retry_capped/{span}/morning": learner.Counts(10, 990) for span in early}


def test_warm_an_offsets_plan_spends_its_first_try_where_late_retries_have_paid():
    last = learner.last_moment(learner.Axis.TIME, PLAN, WINDOW_END, 7)
    chosen = [_opaque(_paid_late(15), seed) for seed in range(50)]
    assert {c.belief.family for c in chosen} == {"retry_capped/d21+"}
    # The first moment of the paying span: the room after it is the later tries'.
    assert {c.moment for c in chosen} == {datetime(2026, 11, 23, 17, tzinfo=UTC)}
    assert all(c.moment <= last for c in chosen)
    # Eight tries at 15% against a 1% try and seven at 15%.
    assert all(c.chance - c.plan_chance > learner.WORTH_MOVING for c in chosen)
    first = chosen[0]
    assert (
        f"with the 7 tries after it the case is recovered {first.chance:.0%} of the time,"
        f" as drawn, against {first.plan_chance:.0%} from the plan's moment"
    ) in first.why()
    # Cold, it explores, but seldom by making a case wait past the plan's
    # moment: with seven tries after it, a late draw seldom adds a point.
    cold = Counter(_opaque({}, seed).moment for seed in range(600))
    assert len(cold) > 1 and cold[PLAN] > 0
    assert sum(n for at, n in cold.items() if at > PLAN) < 600 / 4


def test_the_chance_of_recovery_counts_the_best_tries_left_after_a_moment():
    def rate_at(at):
        return 0.15 if at >= ANCHOR + timedelta(days=21) else 0.01

    # From the plan's moment: its own 1%, then the best seven of the tries
    # that fit, 20 hours apart, before the window ends; nine fit after day 21.
    assert learner.chance_of_recovery(rate_at, PLAN, WINDOW_END, 7) == pytest.approx(
        1 - 0.99 * 0.85**7
    )
    # From day 21: eight at 15%. From day 26 only two more fit: three at 15%.
    day_21 = ANCHOR + timedelta(days=21)
    assert learner.chance_of_recovery(rate_at, day_21, WINDOW_END, 7) == pytest.approx(1 - 0.85**8)
    day_26 = ANCHOR + timedelta(days=26)
    assert learner.chance_of_recovery(rate_at, day_26, WINDOW_END, 7) == pytest.approx(1 - 0.85**3)
    assert learner.chance_of_recovery(rate_at, PLAN, WINDOW_END, 0) == pytest.approx(0.01)


def test_a_try_moves_late_only_where_the_tries_after_it_cannot_win_as_much():
    # Late retries pay so often that the seven after this one recover nearly
    # every case the try would: it keeps the plan's early moment, and a case
    # that pays early is not kept waiting.
    often = [_opaque(_paid_late(60), seed) for seed in range(50)]
    assert {c.moment for c in often} == {PLAN}
    assert "the plan's own moment" in often[0].why()
    assert "with the 7 tries after it the case is recovered 100% of the time" in often[0].why()
    # The plan's last try has none after it: it goes where retries pay.
    last_try = [_opaque(_paid_late(60), seed, tries_after=0) for seed in range(50)]
    assert {c.belief.family for c in last_try} == {"retry_capped/d21+"}


def test_the_same_seed_and_outcomes_choose_the_same_moment():
    counts = {"funds/d3-7/p1/fresh/morning": learner.Counts(3, 4)}
    assert _choose(counts, 7) == _choose(counts, 7)
    assert len({_choose(counts, seed).moment for seed in range(50)}) > 1  # it does explore


def test_on_the_payday_axis_only_a_family_that_paid_as_well_as_the_plans_moves_a_try():
    # Cold, other families draw best now and then, but none has earned a move.
    cold = [_choose({}, seed) for seed in range(600)]
    assert {choice.moment for choice in cold} == {PLAN}
    outdrawn = [choice for choice in cold if choice.passed_over is not None]
    assert 0 < len(outdrawn) < len(cold)
    assert "kept over funds/" in outdrawn[0].why()
    assert "which drew best of 4 but is believed to pay 10%" in outdrawn[0].why()
    # Saturday's family has paid a little less than the plan's: still never.
    saturday = "funds/d3-7/p1/fresh/morning"
    plans_own = "funds/d3-7/p0/fresh/morning"
    less = {saturday: learner.Counts(29, 71), plans_own: learner.Counts(30, 70)}
    assert {_choose(less, seed).moment for seed in range(300)} == {PLAN}
    # A little better than the plan's, prior and all: the draws share the try.
    better = {saturday: learner.Counts(32, 70), plans_own: learner.Counts(30, 70)}
    moved = Counter(_family(_choose(better, seed).moment) for seed in range(300))
    assert set(moved) == {"funds/p0/fresh", "funds/p1/fresh"}
    assert min(moved.values()) > 60


def _family(moment: datetime) -> str:
    return learner.family_of(learner.slot_of("funds", ANCHOR, moment, UTC_ZONE, ANCHOR))


def test_a_family_is_drawn_once_however_many_slots_and_moments_it_holds():
    earliest = ANCHOR + timedelta(hours=20)
    moments = learner.candidates(PLAN, earliest, PLAN + learner.LATER_BY, UTC_ZONE)
    held = Counter(_family(moment) for moment in moments)
    assert max(held.values()) >= 4 and min(held.values()) == 1  # families unequal in moments
    # Every family believed alike, strongly: each should win about as often.
    first_slots = {
        _family(m): learner.slot_of("funds", ANCHOR, m, UTC_ZONE, ANCHOR) for m in moments
    }
    same = {slot: learner.Counts(3000, 7000) for slot in first_slots.values()}
    # The plan's a shade less, so that on this axis no family is held back for it.
    same[first_slots[_family(PLAN)]] = learner.Counts(2998, 7002)
    wins = Counter(_family(_choose(same, seed).moment) for seed in range(3000))
    assert set(wins) == set(held)
    assert max(wins.values()) / min(wins.values()) < 1.4


def test_within_the_winning_family_the_moment_nearest_the_plans():
    earliest = ANCHOR + timedelta(hours=20)
    moments = learner.candidates(PLAN, earliest, PLAN + learner.LATER_BY, UTC_ZONE)
    twins = [m for m in moments if _family(m) == _family(PLAN)]
    assert len(twins) >= 3 and twins[0] < PLAN  # 09:00 that morning, the plan's 09:05, 17:00
    unpaid = learner.Counts(paid=0, declined=1000)
    # The plan's family has paid, the others not: the plan's own moment.
    only_plan = {
        "funds/d3-7/p0/fresh/afternoon": learner.Counts(paid=900, declined=100),
        "funds/d3-7/p1/fresh/morning": unpaid,
        "funds/d3-7/p3+/again/morning": unpaid,
    }
    assert {_choose(only_plan, seed).moment for seed in range(20)} == {PLAN}
    # Only the days before payday have paid: the last of them.
    only_early = {
        "funds/d1-3/p3+/again/morning": learner.Counts(paid=900, declined=100),
        "funds/d3-7/p0/fresh/morning": unpaid,
        "funds/d3-7/p1/fresh/morning": unpaid,
    }
    last = max(m for m in moments if _family(m) == "funds/p3+/again")
    assert last == datetime(2026, 11, 5, 17, tzinfo=UTC)  # Thursday, the eve of payday
    chosen = {_choose(only_early, seed) for seed in range(20)}
    assert {c.moment for c in chosen} == {last}
    assert {c.slot for c in chosen} == {"funds/d3-7/p3+/again/afternoon"}
    assert "of family funds/p3+/again: 89% of retries paid (over 1000 outcome(s)" in (
        chosen.pop().why()
    )


def test_a_slot_never_tried_is_believed_what_its_family_has_learned():
    morning, afternoon = "funds/d3-7/p1/fresh/morning", "funds/d3-7/p1/fresh/afternoon"
    assert learner.family_of(morning) == learner.family_of(afternoon) == "funds/p1/fresh"
    counts = {
        morning: learner.Counts(paid=2, declined=58),
        "funds/d7-14/p1/fresh/evening": learner.Counts(paid=0, declined=40),
    }
    kin = learner.families(counts)
    assert kin == {"funds/p1/fresh": learner.Counts(paid=2, declined=98)}
    held = learner.family_belief(learner.family_of(afternoon), kin)
    assert held.outcomes == 100
    assert held.mean == pytest.approx((0.1 * 12 + 2) / (12 + 100))  # every slot's outcomes
    # Another family knows nothing of it: the prior alone.
    assert learner.family_belief("funds/p0/fresh", kin).mean == pytest.approx(0.1)
    # The family of the plan's own slot starts from the plan's better prior.
    family = learner.family_of(afternoon)
    assert learner.family_belief(family, {}, plans_family=family).mean == pytest.approx(0.2)
    # A slot stored in another shape is a family of its own.
    assert learner.family_of("funds/d3-7/p1/morning") == "funds/d3-7/p1/morning"


def test_warm_it_goes_where_retries_have_paid():
    paying = "funds/d3-7/p1/fresh/morning"  # Saturday morning, the day after payday
    counts = {
        paying: learner.Counts(paid=60, declined=40),
        "funds/d3-7/p1/fresh/afternoon": learner.Counts(paid=3, declined=97),
        "funds/d3-7/p0/fresh/morning": learner.Counts(paid=5, declined=95),
    }
    picks = [_choose(counts, seed) for seed in range(200)]
    share = sum(choice.slot == paying for choice in picks) / len(picks)
    assert share > 0.9
    assert "slot funds/d3-7/p1/fresh/morning" in picks[0].why() and "moved from" in picks[0].why()


def _retry_step(session, case):
    session.expire_all()
    return session.scalars(
        select(RecoveryAttempt).where(
            RecoveryAttempt.case_id == case.id, RecoveryAttempt.step == "retry:1"
        )
    ).one()


def _teach(session, slot: str, paid: int, declined: int) -> None:
    """Outcomes of earlier plan retries, on another case."""
    other = make_case(session, at=ANCHOR - timedelta(days=60))
    for n in range(paid + declined):
        session.add(
            RecoveryAttempt(
                case_id=other.id,
                kind=StepKind.RETRY,
                step=f"retry:{n + 1}",
                number=n + 1,
                status=StepStatus.DONE,
                due_at=ANCHOR - timedelta(days=59),
                idempotency_key=f"recovery-{other.id}-retry:{n + 1}",
                outcome=StepOutcome.PAID if n < paid else StepOutcome.DECLINED,
                slot=slot,
            )
        )
    session.flush()


def test_the_planner_times_the_retry_by_what_has_paid_and_says_why(session, settings):
    _teach(session, "funds/d3-7/p1/fresh/morning", paid=80, declined=20)
    _teach(session, "funds/d3-7/p1/fresh/afternoon", paid=2, declined=98)
    _teach(session, "funds/d3-7/p0/fresh/morning", paid=2, declined=98)
    case = make_case(session, at=ANCHOR, category="funds")
    cases.replan(session, case, ANCHOR, replace(settings, retry_learning=True))
    step = _retry_step(session, case)
    assert step.due_at.date() == datetime(2026, 11, 7).date() and step.due_at.hour == 9
    assert step.why.startswith("learned: moved from the plan's 2026-11-06")


def test_after_a_decline_on_payday_the_planner_knows_that_paydays_money_failed(session, settings):
    _teach(session, "funds/d3-7/p1/fresh/morning", paid=90, declined=10)
    _teach(session, "funds/d3-7/p1/again/morning", paid=0, declined=100)
    friday = PLAN  # try 1 declined on Friday's payday morning
    case = make_case(session, at=ANCHOR, category="funds", last_failure_at=friday)
    # The learner counts a retry on Saturday as another go at Friday's money.
    saturday = datetime(2026, 11, 7, 9, tzinfo=UTC)
    assert planner.slot_of_retry(session, case, saturday) == "funds/d3-7/p1/again/morning"
    cases.replan(session, case, friday + timedelta(hours=1), replace(settings, retry_learning=True))
    step = _retry_step(session, case)
    assert step.why.startswith("learned:")
    assert step.due_at > friday and step.due_at != saturday


def test_the_planner_spends_an_opaque_declines_try_late_when_late_tries_paid(session, settings):
    _teach(session, "retry_capped/d21+/p3+/again/morning", paid=15, declined=85)
    for early in ("d0-1", "d1-3", "d3-7", "d7-14", "d14-21"):
        _teach(session, f"retry_capped/{early}/p3+/again/morning", paid=1, declined=99)
    case = make_case(session, at=ANCHOR, category="retry_capped", decline_code="generic_decline")
    plan = planner.plan_for(Category.RETRY_CAPPED, settings)
    cases.replan(session, case, ANCHOR, replace(settings, retry_learning=True))
    step = _retry_step(session, case)
    tries_after = plan.max_tries - 1
    assert ANCHOR + timedelta(days=21) <= step.due_at
    assert step.due_at <= ANCHOR + plan.window - tries_after * learner.MIN_GAP
    assert step.why.startswith("learned: moved from the plan's 2026-11-0")
    assert "of family retry_capped/d21+" in step.why


def test_a_late_try_leaves_room_for_the_plans_later_tries(session, settings, tmp_path):
    _teach(session, "retry_capped/d21+/p3+/again/morning", paid=120, declined=480)
    _teach(session, "retry_capped/d14-21/p3+/again/morning", paid=72, declined=528)
    for early in ("d0-1", "d1-3", "d3-7", "d7-14"):
        _teach(session, f"retry_capped/{early}/p3+/again/morning", paid=2, declined=398)
    # Eight tries in 24 days: after day 21 there is no room for all of them.
    shorter = tmp_path / "plans.toml"
    shorter.write_text(
        "[retry_capped]\nretry_days = [1, 3, 6, 9, 13, 17, 20, 23]\nwindow_days = 24\n"
    )
    learning = replace(settings, retry_learning=True, plans_file=str(shorter))
    case = make_case(session, at=ANCHOR, category="retry_capped", decline_code="generic_decline")
    cases.replan(session, case, ANCHOR, learning)
    step = _retry_step(session, case)
    assert "of family retry_capped/d14-21" in step.why
    assert ANCHOR + timedelta(days=14) <= step.due_at < ANCHOR + timedelta(days=21)


def test_with_learning_off_the_plan_alone_times_the_retry(session, settings):
    _teach(session, "funds/d3-7/p1/fresh/morning", paid=80, declined=20)
    case = make_case(session, at=ANCHOR, category="funds")
    cases.replan(session, case, ANCHOR, replace(settings, retry_learning=False))
    step = _retry_step(session, case)
    assert step.due_at.date() == PLAN.date() and step.due_at.hour == 9
    assert step.why == (
        "plan funds, try 1 of 8: common payday 1 after the failure, in the customer's morning"
    )


def test_only_the_plans_own_answered_retries_teach(session, settings):
    from recovery.engine import planner

    _teach(session, "funds/d3-7/p1/fresh/morning", paid=3, declined=1)
    _teach(session, "retry/d3-7/p1/fresh/morning", paid=9, declined=0)
    counts = planner.learned_counts(session, "funds")
    assert counts == {"funds/d3-7/p1/fresh/morning": learner.Counts(3, 1)}


def test_plans_explain_prints_each_plan_and_what_its_retries_taught(db):
    import json

    from click.testing import CliRunner

    from recovery.cli import cli
    from recovery.db import session_scope

    with session_scope() as session:
        _teach(session, "funds/d3-7/p1/fresh/morning", paid=30, declined=10)
        _teach(session, "funds/d7-14/p1/fresh/evening", paid=2, declined=0)
        _teach(session, "funds/d0-1/p3+/fresh/night", paid=0, declined=5)
        _teach(session, "retry_capped/d21+/p0/fresh/morning", paid=3, declined=1)
        _teach(session, "retry_capped/d21+/p3+/again/evening", paid=1, declined=3)
    text = CliRunner().invoke(cli, ["plans", "explain"], catch_exceptions=False).output
    told = " ".join(CliRunner().invoke(cli, ["plans", "explain", "--help"]).output.split())
    assert "prior of 10%, worth 12 retries" in told and "starts from 20%" in told
    assert "chance of recovery, with the tries after it, by 1 percentage point(s)" in told
    assert "retry learning: off (RETRY_LEARNING=on turns it on)" in text
    assert "up to 8, one per common payday" in text and "33 days, then cancel_subscription" in text
    assert "from 47 retry outcome(s), by relation to a payday" in text
    assert "from 8 retry outcome(s), by days since the failure" in text
    assert "family retry_capped/d21+" in text and "(4 of 8 paid + prior)" in text
    assert "family funds/p1/fresh" in text and "(32 of 42 paid + prior)" in text
    assert "funds/d3-7/p1/fresh/morning" in text and "30 of 40 paid" in text
    shown = json.loads(CliRunner().invoke(cli, ["plans", "explain", "--json"]).output)
    funds = next(p for p in shown["plans"] if p["plan"] == "funds")
    # What the draws weigh, best first: the family, with its slots of most outcomes.
    assert [f["family"] for f in funds["learned"]] == ["funds/p1/fresh", "funds/p3+/fresh"]
    best = funds["learned"][0]
    assert (best["paid"], best["outcomes"]) == (32, 42)
    assert best["believed_paid_share"] == pytest.approx((0.1 * 12 + 32) / (12 + 42), abs=1e-3)
    assert [s["slot"] for s in best["slots"]] == [
        "funds/d3-7/p1/fresh/morning",
        "funds/d7-14/p1/fresh/evening",
    ]
    assert best["slots"][0] == {"slot": "funds/d3-7/p1/fresh/morning", "paid": 30, "outcomes": 40}
    capped = next(p for p in shown["plans"] if p["plan"] == "retry_capped")
    assert capped["learns_by"] == "time" and funds["learns_by"] == "payday"
    assert [f["family"] for f in capped["learned"]] == ["retry_capped/d21+"]
    top = json.loads(CliRunner().invoke(cli, ["plans", "explain", "--json", "--top", "1"]).output)
    funds = next(p for p in top["plans"] if p["plan"] == "funds")
    assert [(f["family"], len(f["slots"])) for f in funds["learned"]] == [("funds/p1/fresh", 1)]


def test_a_learned_retry_is_planned_inside_the_networks_limits(db, settings):
    """Not only the check before charging: the planner never puts a learned
    retry where Visa's 15 in 30 days forbids it."""
    from recovery.db import session_scope
    from recovery.models import CardAttemptSource

    now = datetime(2026, 11, 2, 12, tzinfo=UTC)
    learning = replace(settings, retry_learning=True)
    with session_scope() as session:
        case = make_case(session, at=now - timedelta(hours=1))
        # Fifteen attempts on this Visa card, the first 20 days ago: none more
        # for 10 days.
        for i in range(15):
            at = now - timedelta(days=20) + timedelta(hours=i)
            planner.record_card_attempt(
                session, case, f"ch_limit_{i}", at, CardAttemptSource.STRIPE, False
            )
        cases.replan(session, case, now, learning)
        planned = session.scalars(
            select(RecoveryAttempt).where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.kind == StepKind.RETRY,
                RecoveryAttempt.status == StepStatus.SCHEDULED,
            )
        ).all()
        allowed = planner.earliest_retry(session, case, now, learning)
    assert allowed == now - timedelta(days=20) + timedelta(days=30)
    assert planned and all(step.due_at >= allowed for step in planned)
