"""Recovery plans: when to retry, which emails, what happens at the end. Pure.

A plan per category. Retry moments are offsets from the failure at Stripe (the
anchor), then moved by cause: insufficient funds to just after a common payday
(1st, 15th, last business day of the month) when one is near, every retry to a
morning hour in the customer's time zone, later by the card's minimum wait, and
by a few minutes of jitter so a billing run's retries do not hit Stripe at one
instant. Operators override plans from a TOML file (RECOVERY_PLANS_FILE).

The card networks' retry limits close the module: whatever a plan says, a
card is never tried more often than they allow.
"""

from __future__ import annotations

import calendar
import enum
import random
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from recovery.engine.classify import Category


class FinalAction(enum.StrEnum):
    CANCEL_SUBSCRIPTION = "cancel_subscription"
    MARK_UNCOLLECTIBLE = "mark_uncollectible"
    LEAVE_PAST_DUE = "leave_past_due"


@dataclass(frozen=True)
class EmailStep:
    day: float  # days after the anchor
    template: str


@dataclass(frozen=True)
class Plan:
    name: str
    retry_days: tuple[float, ...] = ()  # offsets from the anchor; one per try
    max_tries: int = 0
    window_days: float = 21
    emails: tuple[EmailStep, ...] = ()
    final_action: FinalAction = FinalAction.LEAVE_PAST_DUE
    payday_aware: bool = False
    local_hour: int | None = 9  # retry at this hour in the customer's zone
    jitter_minutes: int = 20
    flag_for_review: bool = False

    @property
    def window(self) -> timedelta:
        return timedelta(days=self.window_days)


_FINAL_NOTICE_DAY = 18
# The card cannot be charged as it is: ask for a new or fixed one, then warn.
_ASK_FOR_A_CARD = (
    EmailStep(0, "card_update_needed"),
    EmailStep(3, "card_update_needed"),
    EmailStep(8, "card_update_needed"),
    EmailStep(_FINAL_NOTICE_DAY, "final_notice"),
)

DEFAULT_PLANS: dict[Category, Plan] = {
    Category.RETRY: Plan(
        "retry",
        retry_days=(1, 3, 5, 7, 10, 14, 17, 20),
        max_tries=8,
        emails=(
            EmailStep(0, "payment_failed"),
            EmailStep(7, "payment_failed"),
            EmailStep(_FINAL_NOTICE_DAY, "final_notice"),
        ),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.RETRY_CAPPED: Plan(
        "retry_capped",
        retry_days=(2, 6, 12, 19),
        max_tries=4,
        emails=(
            EmailStep(0, "payment_failed"),
            EmailStep(6, "card_update_needed"),
            EmailStep(_FINAL_NOTICE_DAY, "final_notice"),
        ),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.CUSTOMER_ACTION: Plan(
        "customer_action",
        emails=_ASK_FOR_A_CARD,
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.AUTHENTICATE: Plan(
        "authenticate",
        emails=(
            EmailStep(0, "authentication_required"),
            EmailStep(2, "authentication_required"),
            EmailStep(7, "authentication_required"),
            EmailStep(_FINAL_NOTICE_DAY, "final_notice"),
        ),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.DEAD_CARD: Plan(
        "dead_card",
        emails=_ASK_FOR_A_CARD,
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.DO_NOT_CONTACT: Plan("do_not_contact", flag_for_review=True),
    Category.CHECK_PAID: Plan(
        "check_paid",
        retry_days=(0.05, 3),
        max_tries=2,
        emails=(EmailStep(1, "payment_failed"),),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.OUR_BUG: Plan("our_bug", flag_for_review=True),
}

# Insufficient funds: a retry this close before a payday waits for it.
PAYDAY_PULL = timedelta(days=3)


class PlanFileError(Exception):
    pass


def load_plans(path: str | Path | None) -> dict[Category, Plan]:
    """The default plans, with the operator's overrides from a TOML file:

    [retry]
    retry_days = [1, 4, 8, 15]
    max_tries = 4
    final_action = "mark_uncollectible"
    emails = [{day = 0, template = "payment_failed"}]
    """
    plans = dict(DEFAULT_PLANS)
    if not path:
        return plans
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanFileError(f"{path}: {exc}") from None
    for name, values in data.items():
        try:
            category = Category(name)
        except ValueError:
            known = ", ".join(c.value for c in Category)
            raise PlanFileError(f"{path}: unknown plan [{name}]; plans are: {known}") from None
        where = f"{path} [{name}]"
        if not isinstance(values, dict):
            raise PlanFileError(f"{where}: a plan is a table of settings")
        try:
            plans[category] = _override(plans[category], values, where)
        except (KeyError, TypeError, ValueError) as exc:
            # A value of the wrong kind: a string where days go, an email
            # without its day.
            raise PlanFileError(f"{where}: a setting has the wrong form ({exc})") from None
    return plans


def _override(plan: Plan, values: dict, where: str) -> Plan:
    changes: dict = {}
    for key, value in values.items():
        if key == "retry_days":
            changes[key] = tuple(float(v) for v in value)
        elif key == "emails":
            changes[key] = tuple(EmailStep(float(e["day"]), str(e["template"])) for e in value)
        elif key == "final_action":
            try:
                changes[key] = FinalAction(value)
            except ValueError:
                raise PlanFileError(
                    f"{where}: final_action must be one of "
                    f"{', '.join(a.value for a in FinalAction)}"
                ) from None
        elif key in ("max_tries", "jitter_minutes", "local_hour"):
            changes[key] = int(value)
        elif key in ("window_days",):
            changes[key] = float(value)
        elif key in ("payday_aware", "flag_for_review"):
            changes[key] = bool(value)
        else:
            raise PlanFileError(f"{where}: unknown setting {key!r}")
    plan = replace(plan, **changes)
    if any(day < 0 or day > plan.window_days for day in plan.retry_days):
        raise PlanFileError(f"{where}: every retry day must lie within window_days")
    return plan


# -- timing ------------------------------------------------------------------------


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def last_business_day(year: int, month: int) -> date:
    day = date(year, month, calendar.monthrange(year, month)[1])
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def paydays_after(day: date) -> list[date]:
    """The paydays on or after `day`, within about a month."""
    found = []
    year, month = day.year, day.month
    for _ in range(2):
        for candidate in (
            date(year, month, 1),
            date(year, month, 15),
            last_business_day(year, month),
        ):
            if candidate >= day:
                found.append(candidate)
        month = 1 if month == 12 else month + 1
        year = year + 1 if month == 1 else year
    return sorted(found)


def retry_moment(
    plan: Plan,
    try_number: int,
    anchor: datetime,
    *,
    decline_code: str | None,
    timezone: str | None,
    rng: random.Random,
) -> datetime | None:
    """When try `try_number` (1-based) of `plan` should run, before network limits
    and minimum waits; None when the plan has no such try."""
    if try_number < 1 or try_number > min(plan.max_tries, len(plan.retry_days)):
        return None
    zone = _zone(timezone)
    moment = anchor + timedelta(days=plan.retry_days[try_number - 1])
    local = moment.astimezone(zone)
    if (plan.payday_aware or decline_code == "insufficient_funds") and plan.retry_days[
        try_number - 1
    ] >= 1:
        nearest = paydays_after(local.date())[0]
        if datetime.combine(nearest, time(), zone) - local <= PAYDAY_PULL:
            local = datetime.combine(nearest, local.timetz().replace(tzinfo=None), zone)
    if plan.local_hour is not None and plan.retry_days[try_number - 1] >= 1:
        local = datetime.combine(local.date(), time(plan.local_hour), zone)
    jitter = (
        timedelta(minutes=rng.uniform(0, plan.jitter_minutes))
        if plan.jitter_minutes
        else timedelta()
    )
    return (local + jitter).astimezone(anchor.tzinfo)


def email_moment(step: EmailStep, anchor: datetime, timezone: str | None) -> datetime:
    """Day 0 is at once; later reminders at 10:00 in the customer's zone."""
    if step.day == 0:
        return anchor
    local = (anchor + timedelta(days=step.day)).astimezone(_zone(timezone))
    return datetime.combine(local.date(), time(10), local.tzinfo).astimezone(anchor.tzinfo)


# -- card-network limits -------------------------------------------------------------
# Per card; the attempts come from the `card_attempts` table (ours and
# Stripe's own).
#
# Visa allows 15 reattempts of a declined transaction in 30 days (acquirers
# report the cap rising to 20; configurable), Mastercard 35 in 30 days and 10 in
# 24 hours; after a stop code (a dead card, Visa category 1, Mastercard 03/21,
# advice "do not try again") no network allows another attempt. Counting every
# attempt, the first included, keeps us on the safe side of each rule. Other
# brands get Visa's limits, the stricter of the two.


@dataclass(frozen=True)
class Window:
    length: timedelta
    max_attempts: int


def limits(brand: str | None, visa_max_30d: int = 15) -> tuple[Window, ...]:
    if (brand or "").lower() == "mastercard":
        return (Window(timedelta(days=30), 35), Window(timedelta(hours=24), 10))
    return (Window(timedelta(days=30), visa_max_30d),)


def earliest_allowed(
    attempts: Iterable[datetime],
    windows: tuple[Window, ...],
    at: datetime,
    stopped: bool = False,
) -> datetime | None:
    """The first instant ≥ `at` when one more attempt keeps every window within
    its limit; None when the card may never be tried again."""
    if stopped:
        return None
    times = sorted(attempts)
    moment = at
    if any(window.max_attempts <= 0 for window in windows):
        return None
    # Each pass moves `moment` to where every window has room; attempts already
    # recorded after `at` can refill a window, so repeat until nothing moves.
    while True:
        moved = moment
        for window in windows:
            inside = [t for t in times if moved - window.length < t <= moved]
            if len(inside) >= window.max_attempts:
                # The attempt that must leave the window for one more to fit.
                leaving = inside[len(inside) - window.max_attempts]
                moved = max(moved, leaving + window.length)
        if moved == moment:
            return moment
        moment = moved


def within_limits(attempts: Iterable[datetime], windows: tuple[Window, ...]) -> bool:
    """Whether every window of every length holds at most its limit (for tests)."""
    times = sorted(attempts)
    for window in windows:
        start = 0
        for end, moment in enumerate(times):
            while times[start] <= moment - window.length:
                start += 1
            if end - start + 1 > window.max_attempts:
                return False
    return True
