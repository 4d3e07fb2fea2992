"""Planning: after each thing that happens to a case, decide its next steps.

Called inside the transaction that recorded the change (a failure, a card
update, a declined retry), with the case row locked. It classifies the latest
failure, picks the plan, and schedules steps as rows (steps.py executes them).
Scheduling is idempotent: steps are unique per case and name, so planning the
same case twice, or from a webhook and from our own retry, schedules once.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from functools import lru_cache

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recovery import ledger, plans
from recovery.classify import Category, Classification, Failure, classify
from recovery.config import Settings, get_settings
from recovery.db import insert_ignore
from recovery.models import (
    AuditEntry,
    CardAttempt,
    CaseStatus,
    Customer,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepStatus,
)

log = structlog.get_logger("recovery.engine")

ASSIST, TAKE_OVER = "assist", "take_over"
LIVE = (StepStatus.SCHEDULED.value, StepStatus.CLAIMED.value, StepStatus.EXECUTING.value)


@lru_cache(maxsize=4)
def _plans(path: str | None) -> dict[Category, plans.Plan]:
    return plans.load_plans(path)


def plan_for(category: Category, settings: Settings) -> plans.Plan:
    return _plans(settings.plans_file)[category]


def failure_of(case: RecoveryCase) -> Failure:
    return Failure(
        decline_code=case.decline_code,
        failure_code=case.failure_code,
        advice_code=case.advice_code,
        network_advice_code=case.network_advice_code,
        network_decline_code=case.network_decline_code,
        card_brand=case.card_brand,
        needs_authentication=case.needs_authentication,
    )


def decide_mode(case: RecoveryCase, setting: str) -> str:
    """Two engines must not retry the same card: while Stripe still schedules its
    own retries (next_payment_attempt set) we assist; otherwise we take over."""
    if setting in (ASSIST, TAKE_OVER):
        return setting
    return ASSIST if case.next_payment_attempt is not None else TAKE_OVER


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
    source: str,
    stop: bool,
) -> None:
    if not case.card_fingerprint or not reference:
        return
    insert_ignore(
        session,
        CardAttempt.__table__,
        {
            "fingerprint": case.card_fingerprint,
            "brand": case.card_brand,
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
    """The first moment ≥ `at` the card networks allow another try on this card."""
    attempts, stopped = card_history(session, case.card_fingerprint)
    windows = ledger.limits(case.card_brand, settings.visa_max_attempts_30d)
    return ledger.earliest_allowed([t for t in attempts if t <= at], windows, at, stopped)


def audit(session: Session, case: RecoveryCase, actor: str, action: str, **detail) -> None:
    session.add(AuditEntry(case_id=case.id, actor=actor, action=action, detail=detail))


def cancel_steps(session: Session, case: RecoveryCase, kind: StepKind | None = None) -> int:
    """Cancel the case's scheduled steps (of one kind); a step already executing
    re-checks the case itself."""
    query = update(RecoveryAttempt).where(
        RecoveryAttempt.case_id == case.id,
        RecoveryAttempt.status == StepStatus.SCHEDULED.value,
    )
    if kind is not None:
        query = query.where(RecoveryAttempt.kind == kind.value)
    return session.execute(
        query.values(status=StepStatus.CANCELED.value, outcome="canceled")
    ).rowcount


def schedule(
    session: Session, case: RecoveryCase, kind: StepKind, step: str, due_at: datetime
) -> bool:
    """Add a step unless the case already has one of that name; True if added.
    A step canceled before it ever ran (a plan that changed back) is revived."""
    added = insert_ignore(
        session,
        RecoveryAttempt.__table__,
        {
            "case_id": case.id,
            "kind": kind.value,
            "step": step,
            "status": StepStatus.SCHEDULED.value,
            "due_at": due_at,
            "claims": 0,
            "tries": 0,
            # Derived from our case and step, never random: every execution of
            # this step sends the same key, so Stripe charges at most once.
            "idempotency_key": f"recovery-{case.id}-{step}",
            "created_at": due_at,
        },
        ["case_id", "step"],
    )
    if added:
        return True
    revived = session.execute(
        update(RecoveryAttempt)
        .where(
            RecoveryAttempt.case_id == case.id,
            RecoveryAttempt.step == step,
            RecoveryAttempt.status == StepStatus.CANCELED.value,
            RecoveryAttempt.claims == 0,
        )
        .values(status=StepStatus.SCHEDULED.value, due_at=due_at, outcome=None)
    )
    return revived.rowcount == 1


def _retries_done(session: Session, case: RecoveryCase) -> int:
    return session.scalar(
        select(func.count()).where(
            RecoveryAttempt.case_id == case.id,
            RecoveryAttempt.kind == StepKind.RETRY.value,
            RecoveryAttempt.step.like("retry:%"),
            RecoveryAttempt.step.not_like("retry:card-update:%"),
            RecoveryAttempt.status == StepStatus.DONE.value,
            RecoveryAttempt.outcome.in_(("declined", "paid")),
        )
    )


def _has_live_retry(session: Session, case: RecoveryCase) -> bool:
    return bool(
        session.scalar(
            select(func.count()).where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.kind == StepKind.RETRY.value,
                RecoveryAttempt.status.in_(LIVE),
            )
        )
    )


def _timezone(session: Session, case: RecoveryCase) -> str | None:
    if case.customer_id is None:
        return None
    return session.scalar(select(Customer.timezone).where(Customer.id == case.customer_id))


def plan_case(
    session: Session, case: RecoveryCase, now: datetime, settings: Settings | None = None
) -> Classification:
    """Classify the case's latest failure and schedule what its plan says next."""
    settings = settings or get_settings()
    result = classify(failure_of(case))
    previous = case.category
    case.category = result.category.value
    case.mode = case.mode or decide_mode(case, settings.recovery_mode)
    anchor = case.first_failed_at or case.opened_at
    plan = plan_for(result.category, settings)
    if previous != case.category:
        audit(session, case, "engine", "classified", category=case.category, why=result.source)
        if previous is not None:
            # The plan changed: its retries and emails no longer apply.
            cancel_steps(session, case, StepKind.RETRY)
            cancel_steps(session, case, StepKind.EMAIL)
    if case.status != CaseStatus.OPEN.value or case.paused_at is not None:
        return result
    if result.needs_review:
        if case.flag_reason is None:
            case.flag_reason = f"{result.category.value}: {result.why}"
            audit(session, case, "engine", "flagged", reason=case.flag_reason)
            log.warning("case_flagged", case_id=case.id, category=case.category)
        return result

    tz = _timezone(session, case)
    _schedule_emails(session, case, plan, anchor, now, tz)
    if case.mode == TAKE_OVER:
        if result.may_retry_card:
            _schedule_next_retry(session, case, plan, result, anchor, now, tz, settings)
        if plan.final_action is not plans.FinalAction.LEAVE_PAST_DUE:
            schedule(session, case, StepKind.FINAL, "final", max(anchor + plan.window, now))
    return result


def _schedule_emails(session, case, plan: plans.Plan, anchor, now, tz) -> None:
    category = case.category
    # Reminders whose day has passed (the plan changed late) are skipped, but
    # a new plan always starts with its first email.
    first = True
    for number, step in enumerate(plan.emails):
        name = f"email:{category}:{number}"
        due = plans.email_moment(step, anchor, tz)
        if due < now - timedelta(hours=1) and not first:
            continue
        schedule(session, case, StepKind.EMAIL, name, max(due, now) if first else due)
        first = False


def _schedule_next_retry(session, case, plan, result, anchor, now, tz, settings) -> None:
    if _has_live_retry(session, case):
        return
    number = _retries_done(session, case) + 1
    rng = random.Random(f"{case.id}:{number}")  # noqa: S311 - jitter, reproducible
    moment = plans.retry_moment(
        plan, number, anchor, decline_code=case.decline_code, timezone=tz, rng=rng
    )
    if moment is None:
        return
    last = case.last_failure_at or anchor
    moment = max(moment, now, last + result.min_wait)
    allowed = earliest_retry(session, case, moment, settings)
    if allowed is None or allowed > anchor + plan.window:
        log.info("retry_not_allowed", case_id=case.id, by="network_limits")
        return
    schedule(session, case, StepKind.RETRY, f"retry:{number}", allowed)


def on_card_updated(
    session: Session, case: RecoveryCase, changed_at: datetime, now: datetime, settings=None
) -> bool:
    """A new card: retry the open case at once (both modes), before more emails."""
    settings = settings or get_settings()
    if case.status != CaseStatus.OPEN.value or case.paused_at is not None:
        return False
    if case.category in (Category.DO_NOT_CONTACT.value, Category.OUR_BUG.value):
        return False
    cancel_steps(session, case, StepKind.RETRY)
    gap = timedelta(seconds=settings.card_update_min_gap_seconds)
    due = max(now, (case.last_failure_at or now) + gap)
    added = schedule(
        session, case, StepKind.RETRY, f"retry:card-update:{int(changed_at.timestamp())}", due
    )
    if added:
        audit(session, case, "engine", "retry_on_card_update", due_at=due.isoformat())
    return added
