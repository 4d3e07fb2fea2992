"""Plans over simulated time, and the card-network ledger's limits (property-tested)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.engine import plans
from recovery.engine.classify import Category

ANCHOR = datetime(2026, 11, 3, 14, 30, tzinfo=UTC)


def moments(plan, code=None, tz=None, anchor=ANCHOR):
    out = []
    for n in range(1, plan.max_tries + 2):
        moment = plans.retry_moment(
            plan, n, anchor, decline_code=code, timezone=tz, rng=random.Random(n)
        )
        if moment is not None:
            out.append(moment)
    return out


def test_soft_declines_get_eight_tries_within_three_weeks():
    plan = plans.DEFAULT_PLANS[Category.RETRY]
    found = moments(plan)
    assert len(found) == 8
    assert all(ANCHOR < m <= ANCHOR + timedelta(weeks=3) for m in found)
    assert found == sorted(found)


def test_retries_land_at_a_local_morning_hour():
    plan = plans.DEFAULT_PLANS[Category.RETRY]
    for moment in moments(plan, tz="America/New_York"):
        local = moment.astimezone(plans.ZoneInfo("America/New_York"))
        assert local.hour == 9 and local.minute < plan.jitter_minutes


def test_insufficient_funds_waits_for_a_near_payday():
    plan = plans.DEFAULT_PLANS[Category.RETRY]
    anchor = datetime(2026, 11, 10, 12, tzinfo=UTC)  # first try would be the 11th
    plain = moments(plan, anchor=anchor)
    payday = moments(plan, code="insufficient_funds", anchor=anchor)
    paydays = {date(2026, 11, 15), date(2026, 11, 30), date(2026, 12, 1)}
    assert sum(m.date() in paydays for m in payday) > sum(m.date() in paydays for m in plain)
    assert date(2026, 11, 13) in {m.date() for m in plain}  # day 3 without payday pull
    assert date(2026, 11, 13) not in {m.date() for m in payday}  # pulled to the 15th


def test_last_business_day_skips_the_weekend():
    assert plans.last_business_day(2026, 5) == date(2026, 5, 29)  # the 31st is a Sunday


def test_jitter_spreads_a_billing_run():
    plan = plans.DEFAULT_PLANS[Category.RETRY]
    first = {
        plans.retry_moment(
            plan, 1, ANCHOR, decline_code=None, timezone=None, rng=random.Random(case_id)
        )
        for case_id in range(200)
    }
    assert len(first) > 150
    assert max(first) - min(first) <= timedelta(minutes=plan.jitter_minutes)


def test_no_retries_for_categories_that_must_not_retry():
    for category in (Category.CUSTOMER_ACTION, Category.DEAD_CARD, Category.DO_NOT_CONTACT):
        assert moments(plans.DEFAULT_PLANS[category]) == []
    assert plans.DEFAULT_PLANS[Category.DO_NOT_CONTACT].emails == ()


def test_operator_overrides_from_a_file(tmp_path):
    path = tmp_path / "plans.toml"
    path.write_text(
        '[retry]\nretry_days = [1, 4, 8]\nmax_tries = 3\nfinal_action = "mark_uncollectible"\n'
        'emails = [{day = 0, template = "payment_failed"}]\n'
    )
    loaded = plans.load_plans(path)
    assert loaded[Category.RETRY].retry_days == (1.0, 4.0, 8.0)
    assert loaded[Category.RETRY].final_action is plans.FinalAction.MARK_UNCOLLECTIBLE
    assert loaded[Category.DEAD_CARD] == plans.DEFAULT_PLANS[Category.DEAD_CARD]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nonsense]\nmax_tries = 1\n", "unknown plan"),
        ('[retry]\nfinal_action = "explode"\n', "final_action"),
        ("[retry]\ncolour = 1\n", "unknown setting"),
        ("[retry]\nretry_days = [40]\n", "within window_days"),
        ("[retry\n", "plans.toml"),
    ],
)
def test_a_bad_plan_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "plans.toml"
    path.write_text(text)
    with pytest.raises(plans.PlanFileError, match=message):
        plans.load_plans(path)


# -- the ledger ----------------------------------------------------------------------

START = datetime(2026, 1, 1, tzinfo=UTC)


def test_visa_allows_fifteen_in_thirty_days():
    windows = plans.limits("visa")
    history = [START + timedelta(hours=i) for i in range(15)]
    at = START + timedelta(days=1)
    assert plans.earliest_allowed(history, windows, at) == history[0] + timedelta(days=30)
    assert plans.earliest_allowed(history[:14], windows, at) == at


def test_mastercard_allows_ten_a_day():
    windows = plans.limits("mastercard")
    history = [START + timedelta(minutes=i) for i in range(10)]
    at = START + timedelta(hours=1)
    assert plans.earliest_allowed(history, windows, at) == history[0] + timedelta(hours=24)


def test_a_stop_code_means_never():
    assert plans.earliest_allowed([], plans.limits("visa"), START, stopped=True) is None


def test_visa_cap_is_configurable():
    history = [START + timedelta(hours=i) for i in range(15)]
    windows = plans.limits("visa", visa_max_30d=20)
    assert plans.earliest_allowed(history, windows, START + timedelta(days=1)) == START + timedelta(
        days=1
    )


history_strategy = st.lists(st.integers(min_value=0, max_value=60 * 24 * 40), max_size=60).map(
    lambda minutes: [START + timedelta(minutes=m) for m in minutes]
)


@settings(max_examples=300, deadline=None)
@given(
    history=history_strategy,
    brand=st.sampled_from(["visa", "mastercard", "amex", None]),
    retry_days=st.lists(st.floats(min_value=0, max_value=21), min_size=1, max_size=40),
    gap_minutes=st.integers(min_value=0, max_value=600),
)
def test_planned_retries_never_break_the_network_limits(history, brand, retry_days, gap_minutes):
    """Whatever the history (Stripe's attempts) and however dense the plan, the
    attempts we add keep every rolling window within its limit."""
    windows = plans.limits(brand)
    attempts = sorted(history)
    # Only histories that were themselves within the limits can occur.
    if not plans.within_limits(attempts, windows):
        return
    now = (attempts[-1] if attempts else START) + timedelta(minutes=gap_minutes)
    anchor = now
    for day in sorted(retry_days):
        wanted = max(anchor + timedelta(days=day), now)
        allowed = plans.earliest_allowed(attempts, windows, wanted)
        assert allowed is not None and allowed >= wanted
        attempts.append(allowed)
        now = allowed
        assert plans.within_limits(attempts, windows)
