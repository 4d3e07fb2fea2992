"""Plans over simulated time, and the card-network ledger's limits (property-tested)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovery.config import load_settings
from recovery.engine import plans
from recovery.engine.classify import Category

ANCHOR = datetime(2026, 11, 3, 14, 30, tzinfo=UTC)


def moments(plan, tz=None, anchor=ANCHOR):
    out = []
    for n in range(1, plan.max_tries + 2):
        moment = plans.retry_moment(plan, n, anchor, timezone=tz, rng=random.Random(n))
        if moment is not None:
            out.append(moment)
    return out


def test_soft_declines_get_eight_tries_the_first_within_hours():
    plan = plans.DEFAULT_PLANS[Category.RETRY]
    found = moments(plan)
    assert len(found) == 8
    assert all(ANCHOR < m <= ANCHOR + plan.window for m in found)
    assert found == sorted(found)
    assert found[0] - ANCHOR < timedelta(hours=4)
    # The first email waits for the quick try, which often clears an issuer's error.
    assert plan.emails[0].day >= 1


def test_opaque_declines_get_stripes_eight_tries_spread_over_four_weeks():
    plan = plans.DEFAULT_PLANS[Category.RETRY_CAPPED]
    found = moments(plan)
    assert len(found) == 8
    assert found[-1] - ANCHOR > timedelta(days=21)
    assert all(b - a >= timedelta(days=1) for a, b in zip(found, found[1:], strict=False))


def test_retries_land_at_a_local_morning_hour():
    for category in (Category.RETRY_CAPPED, Category.FUNDS):
        plan = plans.DEFAULT_PLANS[category]
        for moment in moments(plan, tz="America/New_York"):
            local = moment.astimezone(plans.ZoneInfo("America/New_York"))
            assert local.hour == 9 and local.minute < plan.jitter_minutes


def test_insufficient_funds_is_tried_on_each_common_payday_over_a_pay_cycle():
    plan = plans.DEFAULT_PLANS[Category.FUNDS]
    assert plan.window_days >= 30  # a monthly pay cycle and the days around it
    anchor = datetime(2026, 11, 10, 12, tzinfo=UTC)  # a Tuesday
    found = [m.date() for m in moments(plan, anchor=anchor)]
    assert found == [
        date(2026, 11, 13),  # Friday
        date(2026, 11, 20),  # Friday
        date(2026, 11, 27),  # Friday
        date(2026, 11, 30),  # the last business day of November
        date(2026, 12, 1),  # the 1st
        date(2026, 12, 4),  # Friday
        date(2026, 12, 11),  # Friday; the 15th is past the window
    ]
    # 13 November is a Friday and so a payday; the 15th is a Sunday, paid the 13th.
    assert plans.common_paydays(date(2026, 11, 14), date(2026, 11, 16)) == []


def test_the_failure_day_itself_is_not_retried_as_a_payday():
    plan = plans.DEFAULT_PLANS[Category.FUNDS]
    # A Friday, and the day the 15th (a Sunday) is paid: the next payday is a week on.
    friday = datetime(2026, 11, 13, 7, tzinfo=UTC)
    assert moments(plan, anchor=friday)[0].date() == date(2026, 11, 20)


def test_monthly_paydays_pull_a_near_retry_when_the_plan_asks():
    plan = plans.DEFAULT_PLANS[Category.RETRY_CAPPED]
    anchor = datetime(2026, 12, 10, 12, tzinfo=UTC)  # try 2 (day 3) is Sunday the 13th
    pulled = moments(plan, anchor=anchor)
    plain = moments(replace(plan, payday_aware=False), anchor=anchor)
    assert date(2026, 12, 13) in {m.date() for m in plain}
    assert date(2026, 12, 15) in {m.date() for m in pulled}  # pulled to Tuesday the 15th
    assert len(pulled) == len(plain)


def test_a_month_is_paid_on_business_days():
    # November 2026: the 1st is a Sunday (no payday), the 15th a Sunday (paid
    # Friday the 13th), the 30th a Monday.
    assert plans.monthly_paydays(2026, 11) == {date(2026, 11, 13), date(2026, 11, 30)}
    assert plans.monthly_paydays(2026, 12) == {
        date(2026, 12, 1),
        date(2026, 12, 15),
        date(2026, 12, 31),
    }
    # Pulled toward the 15th of November, a retry goes to the 13th, not the Sunday.
    assert plans.paydays_after(date(2026, 11, 12))[0] == date(2026, 11, 13)
    assert plans.paydays_after(date(2026, 11, 14))[0] == date(2026, 11, 30)


@given(hours=st.integers(min_value=0, max_value=24 * 800))
def test_a_pull_to_payday_never_puts_two_tries_on_one_day(hours):
    plan = plans.DEFAULT_PLANS[Category.RETRY_CAPPED]
    anchor = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=hours)
    pulled = [m.date() for m in moments(plan, anchor=anchor)]
    plain = [m.date() for m in moments(replace(plan, payday_aware=False), anchor=anchor)]
    assert len(pulled) == len(plain)
    assert all(a < b for a, b in zip(pulled, pulled[1:], strict=False)), pulled
    for moved, was in zip(pulled, plain, strict=True):
        assert moved == was or (moved > was and moved.weekday() < 5), (moved, was)


def test_every_default_plan_leaves_its_last_email_time_to_work():
    for category, plan in plans.DEFAULT_PLANS.items():
        assert plans.rushed_emails(plan) == [], category
        assert all(day <= plan.window_days for day in plan.retry_days), category


def test_last_business_day_skips_the_weekend():
    assert plans.last_business_day(2026, 5) == date(2026, 5, 29)  # the 31st is a Sunday


def test_jitter_spreads_a_billing_run():
    plan = plans.DEFAULT_PLANS[Category.RETRY]
    first = {
        plans.retry_moment(plan, 1, ANCHOR, timezone=None, rng=random.Random(case_id))
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
        ('[retry]\nfinal_action = "explode"\n', "final_action must be one of"),
        ('[funds]\nretry_on = "moon"\n', "retry_on must be one of days, paydays"),
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


# The cap the engine runs with unless told otherwise: the setting's default.
VISA = load_settings({}).visa_max_attempts_30d


def test_visa_allows_fifteen_in_thirty_days():
    # Visa's published rule, not a copy of our default: raising the default
    # past 15 breaks the rule by default, and this test.
    assert VISA == 15
    windows = plans.limits("visa", VISA)
    history = [START + timedelta(hours=i) for i in range(15)]
    at = START + timedelta(days=1)
    assert plans.earliest_allowed(history, windows, at) == history[0] + timedelta(days=30)
    assert plans.earliest_allowed(history[:14], windows, at) == at


def test_mastercard_allows_ten_a_day():
    windows = plans.limits("mastercard", VISA)
    history = [START + timedelta(minutes=i) for i in range(10)]
    at = START + timedelta(hours=1)
    assert plans.earliest_allowed(history, windows, at) == history[0] + timedelta(hours=24)


def test_a_stop_code_means_never():
    assert plans.earliest_allowed([], plans.limits("visa", VISA), START, stopped=True) is None


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
    windows = plans.limits(brand, VISA)
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
