"""After each change to a case, its next steps: which, and when.

engine/cases.py calls it inside the transaction that recorded the change (a
failure, a card update, a declined retry, a resume), with the case row locked
and only for a case that may still act. It reads the latest failure, picks the
plan for its category, and schedules steps as rows (engine/steps.py).
Scheduling is idempotent: steps are unique per case and name, so planning the
same case twice, or from a webhook and from our own retry, schedules once.

The network ledger lives here too: every charge attempt on a card, Stripe's
and ours, and the earliest moment the card networks allow the next one.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from functools import lru_cache

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from recovery.config import Settings
from recovery.db import insert_ignore
from recovery.engine import learner, plans, steps
from recovery.engine.classify import Category, Classification, Failure, classify
from recovery.models import (
    AuditEntry,
    CardAttempt,
    CardAttemptSource,
    Customer,
    RecoveryAttempt,
    RecoveryCase,
    RetryMode,
    StepKind,
    StepOrigin,
    StepOutcome,
)
from recovery.stripe_api import DeclineDetails

log = structlog.get_logger("recovery.planner")


@lru_cache(maxsize=4)
def _plans(path: str | None) -> dict[Category, plans.Plan]:
    return plans.load_plans(path)


def plan_for(category: Category | str, settings: Settings) -> plans.Plan:
    return _plans(settings.plans_file)[Category(category)]


def failure_of(
    case: RecoveryCase | DeclineDetails, needs_authentication: bool | None = None
) -> Failure:
    """The failure a case (or a decline Stripe reported) describes; the
    classifier reads it. A reported decline needs the customer when Stripe
    says so (`needs_authentication`) or its code does."""
    if needs_authentication is None:
        needs_authentication = isinstance(case, RecoveryCase) and case.needs_authentication
    return Failure(
        decline_code=case.decline_code,
        failure_code=case.failure_code,
        advice_code=case.advice_code,
        network_advice_code=case.network_advice_code,
        network_decline_code=case.network_decline_code,
        card_brand=case.card_brand,
        needs_authentication=needs_authentication,
    )


def decide_mode(case: RecoveryCase, setting: str) -> RetryMode:
    """Two engines must not retry the same card: while Stripe still schedules its
    own retries (next_payment_attempt set) we assist; otherwise we take over."""
    if setting in (RetryMode.ASSIST, RetryMode.TAKE_OVER):
        return RetryMode(setting)
    return RetryMode.ASSIST if case.next_payment_attempt is not None else RetryMode.TAKE_OVER


# -- the network ledger ----------------------------------------------------------------


def card_history(session: Session, fingerprint: str | None) -> tuple[list[datetime], bool]:
    """Every recorded attempt on the card, and whether a stop code was seen."""
    if not fingerprint:
        return [], False
    rows = session.execute(
        select(CardAttempt.attempted_at, CardAttempt.stop).where(
            CardAttempt.fingerprint == fingerprint
        )
    ).all()
    return [r.attempted_at for r in rows], any(r.stop for r in rows)


def record_card_attempt(
    session: Session,
    case: RecoveryCase,
    reference: str | None,
    at: datetime,
    source: CardAttemptSource,
    stop: bool,
    fingerprint: str | None = None,
    brand: str | None = None,
) -> None:
    """One charge attempt on a card (the case's unless named); the same
    reference counts once."""
    fingerprint = fingerprint or case.card_fingerprint
    if not fingerprint or not reference:
        return
    insert_ignore(
        session,
        CardAttempt,
        {
            "fingerprint": fingerprint,
            "brand": brand or case.card_brand,
            "attempted_at": at,
            "source": source,
            "reference": reference,
            "stop": stop,
        },
        ["reference"],
    )


def earliest_retry(
    session: Session, case: RecoveryCase, at: datetime, settings: Settings
) -> datetime | None:
    """The first moment ≥ `at` the card networks allow another try on this card;
    None when a stop code forbids any."""
    attempts, stopped = card_history(session, case.card_fingerprint)
    windows = plans.limits(case.card_brand, settings.visa_max_attempts_30d)
    return plans.earliest_allowed([t for t in attempts if t <= at], windows, at, stopped)


# -- planning ------------------------------------------------------------------------


def classify_case(session: Session, case: RecoveryCase, settings: Settings) -> Classification:
    """Read the case's latest failure: its category, and who retries it."""
    reading = classify(failure_of(case))
    previous = case.category
    case.category = reading.category.value
    # From the newest failure every time: once Stripe stops retrying (no next
    # attempt), we take over, whatever order the failures came in.
    case.mode = decide_mode(case, settings.recovery_mode)
    if previous != case.category:
        session.add(
            AuditEntry.of(case, "engine", "classified", category=case.category, why=reading.source)
        )
    return reading


def schedule_next(
    session: Session,
    case: RecoveryCase,
    reading: Classification,
    now: datetime,
    settings: Settings,
) -> datetime | None:
    """Make the case's scheduled steps what its facts call for now (its caller
    has checked that the case may act), and say when the final action comes,
    if it does. The steps follow from the facts alone, so the same facts,
    reached in any order, schedule the same steps. A case flagged for review
    waits for an operator with nothing scheduled."""
    if case.flag_reason is not None:
        steps.sync(session, case, {})
        return None
    anchor = case.first_failed_at or case.opened_at
    plan = plan_for(reading.category, settings)
    customer = session.get(Customer, case.customer_id) if case.customer_id else None
    tz = customer.timezone if customer else None
    wanted: dict[str, steps.Planned] = {}
    _emails(wanted, case, plan, anchor, now, tz)
    if not steps.has_live_retry(session, case, StepOrigin.OPERATOR):
        new_card = _card_changed_since_decline(session, case, customer)
        if new_card is not None and reading.category not in _NO_CARD_UPDATE_RETRY:
            _card_update_retry(wanted, case, new_card, customer, now, settings)
        elif case.mode is RetryMode.TAKE_OVER and reading.may_retry_card:
            _next_plan_retry(session, wanted, case, plan, reading, anchor, now, tz, settings)
        if case.mode is RetryMode.TAKE_OVER and not any(
            planned.kind is StepKind.RETRY for planned in wanted.values()
        ):
            _backup_retry(session, wanted, case, plan, reading, anchor, now, settings)
    final = plan.final_action is not plans.FinalAction.LEAVE_PAST_DUE
    if case.mode is RetryMode.TAKE_OVER and final:
        wanted[steps.FINAL] = steps.Planned(
            StepKind.FINAL,
            max(anchor + plan.window, now),
            why=f"plan {plan.name}: {plan.final_action.value} when its"
            f" {plan.window_days:g}-day window ends",
        )
    steps.sync(session, case, wanted)
    return wanted[steps.FINAL].due_at if steps.FINAL in wanted else None


# A flagged case's categories: no retry, not even on a new card, until reviewed.
_NO_CARD_UPDATE_RETRY = frozenset({Category.DO_NOT_CONTACT, Category.OUR_BUG})


def flag_if_needed(session: Session, case: RecoveryCase, reading: Classification) -> None:
    """A failure that needs an operator (suspected fraud, our own bad request)
    flags the case for good: whichever failure said so, in whatever order."""
    if reading.needs_review and case.flag_reason is None:
        case.flag_reason = f"{reading.category.value}: {reading.why}"
        session.add(AuditEntry.of(case, "engine", "flagged", reason=case.flag_reason))
        log.warning("case_flagged", case_id=case.id, category=reading.category.value)


def _card_changed_since_decline(
    session: Session, case: RecoveryCase, customer: Customer | None
) -> datetime | None:
    """When the customer changed the card, if after the case's last decline
    and no retry has run for that change yet (one that found the declined
    card still the one Stripe charges leaves the plan to go on)."""
    changed = customer.card_updated_at if customer else None
    last = case.last_failure_at or case.opened_at
    if changed is None or changed <= last:
        return None
    return None if steps.has_run(session, case, steps.card_update_retry_name(changed)) else changed


def _another_card(case: RecoveryCase, customer: Customer | None) -> bool:
    """Whether the card a retry on this card update will charge is known to be
    another than the one that declined: the card saved through our link, else
    the customer's new invoice default."""
    card = customer and (customer.saved_payment_method or customer.default_payment_method)
    return bool(card) and card != case.payment_method_id


def _card_update_retry(
    wanted: dict[str, steps.Planned],
    case: RecoveryCase,
    changed_at: datetime,
    customer: Customer | None,
    now: datetime,
    settings: Settings,
) -> None:
    """A new card: retry before more emails. Another card is charged at once;
    the gap after the last decline spares only the card that declined, so it
    holds while the card to charge may be that one (its details updated, or a
    change that named no card)."""
    due = now
    if not _another_card(case, customer):
        gap = timedelta(seconds=settings.card_update_min_gap_seconds)
        due = max(now, (case.last_failure_at or now) + gap)
    wanted[steps.card_update_retry_name(changed_at)] = steps.Planned(
        StepKind.RETRY, due, origin=StepOrigin.CARD_UPDATE, why="the customer changed the card"
    )


def _emails(
    wanted: dict[str, steps.Planned],
    case: RecoveryCase,
    plan: plans.Plan,
    anchor: datetime,
    now: datetime,
    tz: str | None,
) -> None:
    category = case.category or plan.name
    # Reminders whose day has passed (the plan changed late) are skipped, but
    # a new plan always starts with its first email.
    first = True
    for number, email in enumerate(plan.emails):
        due = plans.email_moment(email, anchor, tz)
        if due < now - timedelta(hours=1) and not first:
            continue
        wanted[steps.email_name(category, number)] = steps.Planned(
            StepKind.EMAIL,
            max(due, now) if first else due,
            number=number,
            template=email.template,
            why=f"plan {plan.name}, email {number + 1} of {len(plan.emails)}:"
            f" day {email.day:g} after the failure",
        )
        first = False


def _next_plan_retry(
    session: Session,
    wanted: dict[str, steps.Planned],
    case: RecoveryCase,
    plan: plans.Plan,
    reading: Classification,
    anchor: datetime,
    now: datetime,
    tz: str | None,
    settings: Settings,
) -> None:
    number = steps.plan_retries_made(session, case) + 1
    rng = random.Random(f"{case.id}:{number}")  # noqa: S311 - jitter, reproducible
    moment = plans.retry_moment(plan, number, anchor, timezone=tz, rng=rng)
    if moment is None:
        return
    why = f"plan {plan.name}, try {number} of {plan.max_tries}: {_plan_reason(plan, number)}"
    last = case.last_failure_at or anchor
    if settings.retry_learning:
        choice = _learned(session, case, plan, number, anchor, moment, last, reading, now, tz)
        if choice is not None:
            moment, why = choice.moment, f"learned: {choice.why()}"
    earliest = max(now, last + reading.min_wait)
    if moment < earliest:
        if reading.min_wait and earliest == last + reading.min_wait:
            why += f"; after the decline's wait ({reading.source})"
        moment = earliest
    allowed = earliest_retry(session, case, moment, settings)
    if allowed is None or allowed > anchor + plan.window:
        log.info("retry_not_allowed", case_id=case.id, by="network_limits")
        return
    if allowed > moment:
        why += "; later by the card networks' limit on attempts"
    wanted[steps.plan_retry_name(number)] = steps.Planned(
        StepKind.RETRY, allowed, number=number, why=why[:400]
    )


# Other saved cards tried per case at most, and how long after the last
# decline the first of them is tried.
BACKUP_TRIES = 2
BACKUP_GAP = timedelta(hours=1)
_NO_BACKUP = frozenset({Category.CHECK_PAID, Category.DO_NOT_CONTACT, Category.OUR_BUG})


def _backup_retry(
    session: Session,
    wanted: dict[str, steps.Planned],
    case: RecoveryCase,
    plan: plans.Plan,
    reading: Classification,
    anchor: datetime,
    now: datetime,
    settings: Settings,
) -> None:
    """Once the card on file has no try left (its plan's are spent, or it can
    never be retried), one on another card saved on the customer; which card
    is chosen when the step runs (engine/retries.py), from Stripe's list."""
    if (
        not settings.backup_cards
        or case.stripe_customer_id in settings.backup_cards_exclude
        or reading.category in _NO_BACKUP
    ):
        return
    found = steps.backup_outcomes(session, case)
    if StepOutcome.NO_BACKUP_CARD in found or StepOutcome.PAID in found:
        return
    if len(found) >= BACKUP_TRIES:
        return
    due = max(now, (case.last_failure_at or anchor) + BACKUP_GAP)
    if due > anchor + plan.window:
        return
    spent = "cannot be retried" if not reading.may_retry_card else "has had the plan's tries"
    wanted[steps.backup_retry_name(len(found) + 1)] = steps.Planned(
        StepKind.RETRY,
        due,
        origin=StepOrigin.BACKUP_CARD,
        number=len(found) + 1,
        why=f"the card on file {spent}: another card saved on the customer",
    )


def _plan_reason(plan: plans.Plan, number: int) -> str:
    if plan.retry_on is plans.RetryOn.PAYDAYS:
        return f"common payday {number} after the failure, in the customer's morning"
    day = plan.retry_days[number - 1]
    text = f"day {day:g} after the failure"
    return text + (", pulled to a near payday" if plan.payday_aware and day >= 1 else "")


# -- learning --------------------------------------------------------------------------


def learned_counts(session: Session, category: str) -> dict[str, learner.Counts]:
    """Paid and declined plan retries per slot of `category`, over every case."""
    rows = session.execute(
        select(RecoveryAttempt.slot, RecoveryAttempt.outcome, func.count())
        .where(
            RecoveryAttempt.slot.like(f"{category}/%"),
            RecoveryAttempt.outcome.in_((StepOutcome.PAID, StepOutcome.DECLINED)),
        )
        .group_by(RecoveryAttempt.slot, RecoveryAttempt.outcome)
    ).all()
    paid: dict[str, int] = {}
    declined: dict[str, int] = {}
    for slot, outcome, count in rows:
        if slot is not None:
            (paid if outcome is StepOutcome.PAID else declined)[slot] = count
    return {
        slot: learner.Counts(paid.get(slot, 0), declined.get(slot, 0))
        for slot in {*paid, *declined}
    }


def _learned(
    session: Session,
    case: RecoveryCase,
    plan: plans.Plan,
    number: int,
    anchor: datetime,
    plan_moment: datetime,
    last: datetime,
    reading: Classification,
    now: datetime,
    tz: str | None,
) -> learner.Choice | None:
    """The learner's moment for this try, between the earliest the case may be
    tried again and the latest the plan's axis allows (learner.last_moment)."""
    previous = (
        plans.retry_moment(plan, number - 1, anchor, timezone=tz, rng=random.Random(0))
        if number > 1
        else anchor
    ) or anchor
    gap = learner.min_gap(plan_moment - previous)
    earliest = max(now, last + max(gap, reading.min_wait))
    category = case.category or plan.name
    # Thompson's draws, reproducible per case and try.
    rng = random.Random(f"learn:{case.id}:{number}")  # noqa: S311
    axis = learner_axis(plan)
    return learner.choose(
        category,
        anchor,
        plan_moment,
        earliest,
        anchor + plan.window,
        plan.offset_tries - number,
        plans.zone(tz),
        last,
        learned_counts(session, category),
        rng,
        axis,
    )


def learner_axis(plan: plans.Plan) -> learner.Axis:
    """A plan of paydays bets on money arriving, one of offsets on time."""
    if plan.retry_on is plans.RetryOn.PAYDAYS:
        return learner.Axis.PAYDAY
    return learner.Axis.TIME


def slot_of_retry(session: Session, case: RecoveryCase, at: datetime) -> str:
    """The slot a plan retry run `at` is counted in: called before its own
    decline is recorded, so it names the bet as it was made."""
    customer = session.get(Customer, case.customer_id) if case.customer_id else None
    anchor = case.first_failed_at or case.opened_at
    return learner.slot_of(
        case.category or "unknown",
        anchor,
        at,
        plans.zone(customer.timezone if customer else None),
        case.last_failure_at or anchor,
    )
