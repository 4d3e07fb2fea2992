"""Recovery plans: when to retry, which emails, what happens at the end. Pure.

A plan per category. Retry moments are either offsets from the failure at
Stripe (the anchor), pulled to a near payday when the plan asks, or the
common paydays themselves (money that is missing now arrives with pay); then
a morning hour in the customer's time zone, later by the card's minimum wait,
and a few minutes of jitter so a billing run's retries do not hit Stripe at
one instant. Operators override plans from a TOML file (RECOVERY_PLANS_FILE).

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
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from recovery.engine.classify import Category


class FinalAction(enum.StrEnum):
    CANCEL_SUBSCRIPTION = "cancel_subscription"
    MARK_UNCOLLECTIBLE = "mark_uncollectible"
    LEAVE_PAST_DUE = "leave_past_due"


class RetryOn(enum.StrEnum):
    DAYS = "days"  # the plan's retry_days, each an offset from the anchor
    PAYDAYS = "paydays"  # one try on each common payday (common_paydays) in the window


@dataclass(frozen=True)
class EmailStep:
    day: float  # days after the anchor
    template: str


@dataclass(frozen=True)
class Plan:
    name: str
    retry_days: tuple[float, ...] = ()  # offsets from the anchor; one per try
    max_tries: int = 0
    window_days: float = 28
    emails: tuple[EmailStep, ...] = ()
    final_action: FinalAction = FinalAction.LEAVE_PAST_DUE
    payday_aware: bool = False
    local_hour: int | None = 9  # retry at this hour in the customer's zone
    jitter_minutes: int = 20
    flag_for_review: bool = False
    retry_on: RetryOn = RetryOn.DAYS
    # The emails whose first sending also goes by SMS to customers who
    # consented (customers/texting.py): by default the reminder asking the
    # customer to act, and the final notice.
    sms: tuple[str, ...] = ("card_update_needed", "authentication_required", "final_notice")

    @property
    def window(self) -> timedelta:
        return timedelta(days=self.window_days)

    @property
    def offset_tries(self) -> int:
        """The tries a plan of offsets makes: a day for each, up to max_tries."""
        return min(self.max_tries, len(self.retry_days))


# Why the defaults are what they are. Sources:
#
# [stripe] Stripe, "Automate payment retries" (Smart Retries): "The
#   recommended default is 8 tries within 2 weeks", no retry after a hard
#   decline. https://docs.stripe.com/billing/revenue-recovery/smart-retries
# [visa] Visa's retry rules: at most 15 reattempts of a declined
#   transaction in 30 days (20 for categories 2-4 from April 2026; the cap is
#   the VISA_MAX_ATTEMPTS_30D setting), none after a category 1 decline.
# [mastercard] Mastercard's Merchant Advice Codes: 24-30 name the wait before
#   the next attempt (1 hour to 10 days), honoured in classify.py; 35
#   attempts in 30 days at most.
# [windows] Published dunning windows for declines that wait on money:
#   25-28 days (Churn Buster), 30 days (Butter, Paddle), at least 27 days
#   (Recurly): a full pay cycle, which 21 days is not.
# [bls] US Bureau of Labor Statistics, Current Employment Statistics, March
#   2013 ("How frequently do private businesses pay workers?", Beyond the
#   Numbers, May 2014): 32.4% of private businesses pay weekly, 36.5%
#   biweekly, 19.8% semimonthly, 11.3% monthly. Weekly and biweekly pay lands
#   on a fixed weekday, Friday by custom; semimonthly on the 15th and the
#   last day, or the 1st and the 15th; monthly on the last business day.
#
# Measured with `recovery simulate --policy previous-defaults --policy
# stripe-recommended --policy defaults --seeds 10` (docs/simulation.md, "Does it recover
# more than Stripe?"): one seed proves nothing about a plan.

# The last reminder must have time to work before the end: customers answer
# up to a day or so after an email arrives.
FINAL_GRACE_DAYS = 3.0

_REMIND_DAYS = (0, 3, 7, 14)
_FINAL_NOTICE = EmailStep(23, "final_notice")


def _reminders(template: str, days: Iterable[float] = _REMIND_DAYS) -> tuple[EmailStep, ...]:
    return (*(EmailStep(day, template) for day in days), _FINAL_NOTICE)


DEFAULT_PLANS: dict[Category, Plan] = {
    # Money arrives with pay [bls]: one try per common payday, over a window
    # holding a whole monthly pay cycle with the days around it [windows], as
    # many tries as Stripe recommends [stripe], well inside Visa's 15 [visa].
    Category.FUNDS: Plan(
        "funds",
        retry_on=RetryOn.PAYDAYS,
        max_tries=8,
        window_days=33,
        emails=(
            EmailStep(0, "payment_failed"),
            EmailStep(7, "payment_failed"),
            EmailStep(14, "card_update_needed"),
            EmailStep(21, "payment_failed"),
            EmailStep(28, "final_notice"),
        ),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    # Errors at the issuer clear within hours: the first try comes before
    # any email, which waits a day for the tries to do their work.
    Category.RETRY: Plan(
        "retry",
        retry_days=(0.125, 1, 3, 5, 7, 10, 14, 20),
        max_tries=8,
        emails=(*_reminders("payment_failed", (1, 7, 14)),),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    # An opaque decline is approved, when it is, on some attempt and not
    # another: Stripe's eight tries [stripe], spread over four weeks so a card
    # that recovers late still meets one, and pulled to paydays, since
    # "declined" often hides missing money.
    Category.RETRY_CAPPED: Plan(
        "retry_capped",
        retry_days=(1, 3, 6, 9, 13, 17, 21, 26),
        max_tries=8,
        payday_aware=True,
        emails=(
            EmailStep(0, "payment_failed"),
            EmailStep(6, "card_update_needed"),
            EmailStep(13, "payment_failed"),
            EmailStep(19, "card_update_needed"),
            _FINAL_NOTICE,
        ),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    # The card cannot be charged as it is: ask for a new or fixed one, then warn.
    Category.CUSTOMER_ACTION: Plan(
        "customer_action",
        emails=_reminders("card_update_needed"),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.AUTHENTICATE: Plan(
        "authenticate",
        emails=_reminders("authentication_required", (0, 2, 7, 14)),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.DEAD_CARD: Plan(
        "dead_card",
        emails=_reminders("card_update_needed"),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.DO_NOT_CONTACT: Plan("do_not_contact", flag_for_review=True),
    Category.CHECK_PAID: Plan(
        "check_paid",
        retry_days=(0.05, 3),
        max_tries=2,
        window_days=21,
        emails=(EmailStep(1, "payment_failed"),),
        final_action=FinalAction.CANCEL_SUBSCRIPTION,
    ),
    Category.OUR_BUG: Plan("our_bug", flag_for_review=True),
}

# A retry pulled toward paydays moves at most this far.
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
            changes[key] = _member(FinalAction, key, value, where)
        elif key in ("max_tries", "jitter_minutes", "local_hour"):
            changes[key] = int(value)
        elif key in ("window_days",):
            changes[key] = float(value)
        elif key in ("payday_aware", "flag_for_review"):
            changes[key] = bool(value)
        elif key == "retry_on":
            changes[key] = _member(RetryOn, key, value, where)
        elif key == "sms":
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise PlanFileError(f"{where}: sms is a list of email templates")
            changes[key] = tuple(value)
        else:
            raise PlanFileError(f"{where}: unknown setting {key!r}")
    plan = replace(plan, **changes)
    check_plan(plan, where)
    return plan


E = TypeVar("E", bound=enum.StrEnum)


def _member(kind: type[E], key: str, value: str, where: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise PlanFileError(
            f"{where}: {key} must be one of {', '.join(m.value for m in kind)}"
        ) from None


def check_plan(plan: Plan, where: str) -> None:
    if any(day < 0 or day > plan.window_days for day in plan.retry_days):
        raise PlanFileError(f"{where}: every retry day must lie within window_days")


def rushed_emails(plan: Plan) -> list[EmailStep]:
    """Emails too close to the final action for the customer to answer them
    (the defaults have none; an operator's plan may choose otherwise)."""
    if plan.final_action is FinalAction.LEAVE_PAST_DUE:
        return []
    return [email for email in plan.emails if email.day > plan.window_days - FINAL_GRACE_DAYS]


# -- timing ------------------------------------------------------------------------


def zone(name: str | None) -> ZoneInfo:
    """The customer's zone; UTC when unknown or not a zone."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _business_day_on_or_before(day: date) -> date:
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def last_business_day(year: int, month: int) -> date:
    return _business_day_on_or_before(date(year, month, calendar.monthrange(year, month)[1]))


def monthly_paydays(year: int, month: int) -> set[date]:
    """A month's common paydays [bls]: the 1st when it is a business day, the
    15th (or the business day before) and the last business day."""
    found = {
        _business_day_on_or_before(date(year, month, 15)),
        last_business_day(year, month),
    }
    first = date(year, month, 1)
    if first.weekday() < 5:
        found.add(first)
    return found


def _months(first: date, last: date) -> list[tuple[int, int]]:
    found = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        found.append((year, month))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return found


def paydays_after(day: date) -> list[date]:
    """The monthly paydays on or after `day`, within about a month."""
    later = day + timedelta(days=31)
    found = set().union(*(monthly_paydays(y, m) for y, m in _months(day, later)))
    return sorted(d for d in found if d >= day)


def common_paydays(first: date, last: date) -> list[date]:
    """The days from `first` to `last` when many people are paid [bls]:
    Fridays (weekly and biweekly pay) and each month's paydays."""
    found = set().union(*(monthly_paydays(y, m) for y, m in _months(first, last)))
    friday = first + timedelta(days=(4 - first.weekday()) % 7)
    while friday <= last:
        found.add(friday)
        friday += timedelta(days=7)
    return sorted(d for d in found if first <= d <= last)


def retry_moment(
    plan: Plan,
    try_number: int,
    anchor: datetime,
    *,
    timezone: str | None,
    rng: random.Random,
) -> datetime | None:
    """When try `try_number` (1-based) of `plan` should run, before network limits
    and minimum waits; None when the plan has no such try."""
    where = zone(timezone)
    if plan.retry_on is RetryOn.PAYDAYS:
        local = _payday_try(plan, try_number, anchor, where)
        if local is None:
            return None
    else:
        if try_number < 1 or try_number > plan.offset_tries:
            return None
        offset = plan.retry_days[try_number - 1]
        local = (anchor + timedelta(days=offset)).astimezone(where)
        if plan.payday_aware and offset >= 1:
            nearest = paydays_after(local.date())[0]
            # Never onto or past the next try's day: two tries on one payday
            # would spend a try where one does the job.
            following = (
                (anchor + timedelta(days=plan.retry_days[try_number])).astimezone(where).date()
                if try_number < len(plan.retry_days)
                else None
            )
            if datetime.combine(nearest, time(), where) - local <= PAYDAY_PULL and (
                following is None or nearest < following
            ):
                local = datetime.combine(nearest, local.timetz().replace(tzinfo=None), where)
        if plan.local_hour is not None and offset >= 1:
            local = datetime.combine(local.date(), time(plan.local_hour), where)
    jitter = (
        timedelta(minutes=rng.uniform(0, plan.jitter_minutes))
        if plan.jitter_minutes
        else timedelta()
    )
    return (local + jitter).astimezone(anchor.tzinfo)


def _payday_try(plan: Plan, try_number: int, anchor: datetime, where: ZoneInfo) -> datetime | None:
    """Try n on the n-th common payday after the failure's own day, in the
    morning: pay has arrived by then and has not been spent."""
    start = anchor.astimezone(where)
    days = common_paydays(
        start.date() + timedelta(days=1), (anchor + plan.window).astimezone(where).date()
    )
    if try_number < 1 or try_number > min(plan.max_tries, len(days)):
        return None
    hour = time(plan.local_hour if plan.local_hour is not None else start.hour)
    return datetime.combine(days[try_number - 1], hour, where)


def email_moment(step: EmailStep, anchor: datetime, timezone: str | None) -> datetime:
    """Day 0 is at once; later reminders at 10:00 in the customer's zone."""
    if step.day == 0:
        return anchor
    local = (anchor + timedelta(days=step.day)).astimezone(zone(timezone))
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


def limits(brand: str | None, visa_max_30d: int) -> tuple[Window, ...]:
    """The rolling windows a card's brand allows attempts in; Visa's cap is
    the VISA_MAX_ATTEMPTS_30D setting."""
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
