"""Step rows: a case's retries, emails and final action as due work in the database.

    scheduled ─claim─▶ claimed ─start─▶ executing ─▶ done
        ▲   (lease ran out: claimed again, claims + 1)  │
        └──────── transient failure, with backoff ──────┘
    scheduled ─▶ canceled (the plan changed, the case closed or was paused)

A claim is one UPDATE over `FOR UPDATE SKIP LOCKED` rows on PostgreSQL (one
statement under SQLite's single writer lock), so concurrent dispatchers never
take the same step. Each claim bumps `claims`; an executor starts and finishes
a step only for the claim it was handed, so a redelivered task or a second beat
does nothing. A worker that dies mid-step loses its lease and the step is
claimed again: a retry then re-sends the same idempotency key, and Stripe
answers with the first charge's result instead of charging twice.

A step's kind, origin, number and template are columns; its name is built
here, once, to be unique per case and readable, and is never parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Update, func, or_, select, update
from sqlalchemy.orm import Session

from recovery import clock
from recovery.config import Settings
from recovery.db import dialect_of, insert_ignore, rows_changed, session_scope
from recovery.models import (
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepOrigin,
    StepOutcome,
    StepStatus,
)

log = structlog.get_logger("recovery.steps")

Claim = tuple[int, int]  # (step id, claim number)
LIVE = (StepStatus.SCHEDULED, StepStatus.CLAIMED, StepStatus.EXECUTING)
FINAL = "final"


# -- names -------------------------------------------------------------------------


def plan_retry_name(number: int) -> str:
    return f"retry:{number}"


def card_update_retry_name(changed_at: datetime) -> str:
    return f"retry:card-update:{int(changed_at.timestamp())}"


def operator_retry_name(at: datetime, forced: bool) -> str:
    return f"retry:{'forced' if forced else 'manual'}:{int(at.timestamp())}"


def backup_retry_name(number: int) -> str:
    return f"retry:backup:{number}"


def email_name(category: str, number: int) -> str:
    return f"email:{category}:{number}"


def label(origin: StepOrigin, kind: StepKind, number: int | None) -> str:
    """What the reports call a step: the plan's retry 3, a card update's retry."""
    if origin is StepOrigin.PLAN:
        return f"{kind.value}:{number}" if number is not None else kind.value
    return f"{kind.value}:{origin.value.replace('_', '-')}"


# -- scheduling --------------------------------------------------------------------


def schedule(
    session: Session,
    case: RecoveryCase,
    kind: StepKind,
    name: str,
    due_at: datetime,
    *,
    origin: StepOrigin = StepOrigin.PLAN,
    number: int | None = None,
    template: str | None = None,
    forced: bool = False,
    why: str | None = None,
) -> bool:
    """Add a step unless the case already has one of that name; True if added.
    A step canceled before it ever ran (a plan that changed back) is revived."""
    added = insert_ignore(
        session,
        RecoveryAttempt,
        {
            "case_id": case.id,
            "kind": kind,
            "step": name,
            "origin": origin,
            "number": number,
            "template": template,
            "forced": forced,
            "status": StepStatus.SCHEDULED,
            "due_at": due_at,
            "why": why,
            "claims": 0,
            "tries": 0,
            # Derived from our case and step, never random: every execution of
            # this step sends the same key, so Stripe charges at most once.
            "idempotency_key": f"recovery-{case.id}-{name}",
            "created_at": due_at,
        },
        ["case_id", "step"],
    )
    if added:
        return True
    revived = rows_changed(
        session.execute(
            update(RecoveryAttempt)
            .where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.step == name,
                RecoveryAttempt.status == StepStatus.CANCELED,
                RecoveryAttempt.claims == 0,
            )
            .values(status=StepStatus.SCHEDULED, due_at=due_at, outcome=None, why=why)
        )
    )
    return revived == 1


def cancel(session: Session, case: RecoveryCase, kind: StepKind | None = None) -> int:
    """Cancel the case's scheduled steps (of one kind); a step already executing
    asks engine/cases.py itself whether it may still act."""
    query = update(RecoveryAttempt).where(
        RecoveryAttempt.case_id == case.id,
        RecoveryAttempt.status == StepStatus.SCHEDULED,
    )
    if kind is not None:
        query = query.where(RecoveryAttempt.kind == kind)
    return rows_changed(
        session.execute(query.values(status=StepStatus.CANCELED, outcome=StepOutcome.CANCELED))
    )


def plan_retries_made(session: Session, case: RecoveryCase) -> int:
    """The plan's retries that reached Stripe and got an answer."""
    return int(
        session.scalar(
            select(func.count()).where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.kind == StepKind.RETRY,
                RecoveryAttempt.origin == StepOrigin.PLAN,
                RecoveryAttempt.status == StepStatus.DONE,
                RecoveryAttempt.outcome.in_((StepOutcome.DECLINED, StepOutcome.PAID)),
            )
        )
        or 0
    )


def backup_outcomes(session: Session, case: RecoveryCase) -> list[StepOutcome]:
    """What the case's tries on other saved cards found, in order."""
    return list(
        session.scalars(
            select(RecoveryAttempt.outcome)
            .where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.origin == StepOrigin.BACKUP_CARD,
                RecoveryAttempt.status == StepStatus.DONE,
                RecoveryAttempt.outcome.is_not(None),
            )
            .order_by(RecoveryAttempt.id)
        )
    )


def keys_of(session: Session, case: RecoveryCase, origin: StepOrigin) -> list[str]:
    """The idempotency keys of the case's steps of one origin."""
    return list(
        session.scalars(
            select(RecoveryAttempt.idempotency_key).where(
                RecoveryAttempt.case_id == case.id, RecoveryAttempt.origin == origin
            )
        )
    )


def has_live_retry(session: Session, case: RecoveryCase, origin: StepOrigin | None = None) -> bool:
    """Whether a retry (of that origin) is scheduled or under way."""
    query = select(func.count()).where(
        RecoveryAttempt.case_id == case.id,
        RecoveryAttempt.kind == StepKind.RETRY,
        RecoveryAttempt.status.in_(LIVE),
    )
    if origin is not None:
        query = query.where(RecoveryAttempt.origin == origin)
    return bool(session.scalar(query))


# How much later than another process's clock an operator's retry, made due
# "now" by its own, may look: the wait for the case's lock, clocks apart.
OPERATOR_CLOCK_SLACK = timedelta(minutes=1)


def retry_in_flight(session: Session, case: RecoveryCase, now: datetime) -> str | None:
    """The name of the case's retry that is claimed, running, due by `now`,
    or an operator's just made. An operator's retry is due when it is made,
    but by the clock of the process that made it: another that read its
    clock a moment earlier, then waited for the case, would see it as due
    later and replace it. One the networks or a backoff deferred is due
    later by more than that, and a new request replaces it."""
    return session.scalar(
        select(RecoveryAttempt.step)
        .where(
            RecoveryAttempt.case_id == case.id,
            RecoveryAttempt.kind == StepKind.RETRY,
            RecoveryAttempt.status.in_(LIVE),
            (RecoveryAttempt.status != StepStatus.SCHEDULED)
            | (RecoveryAttempt.due_at <= now)
            | (
                (RecoveryAttempt.origin == StepOrigin.OPERATOR)
                & (RecoveryAttempt.due_at <= now + OPERATOR_CLOCK_SLACK)
            ),
        )
        .order_by(RecoveryAttempt.id)
        .limit(1)
    )


def has_run(session: Session, case: RecoveryCase, name: str) -> bool:
    """Whether the case's step of that name has run (whatever it found)."""
    found = session.scalar(
        select(RecoveryAttempt.id).where(
            RecoveryAttempt.case_id == case.id,
            RecoveryAttempt.step == name,
            RecoveryAttempt.status == StepStatus.DONE,
        )
    )
    return found is not None


@dataclass(frozen=True)
class Planned:
    """A step the planner wants scheduled, by name (see sync)."""

    kind: StepKind
    due_at: datetime
    origin: StepOrigin = StepOrigin.PLAN
    number: int | None = None
    template: str | None = None
    why: str | None = None


def sync(session: Session, case: RecoveryCase, wanted: dict[str, Planned]) -> None:
    """Make the case's scheduled steps (all but an operator's) exactly `wanted`:
    a missing one is added (or revived if it was canceled before it ran), one
    due at another moment is moved unless it is backing off, any other is
    canceled. Steps under way or done are left as they are: a done step's
    name is never scheduled again."""
    scheduled = {
        row.step: row
        for row in session.execute(
            select(
                RecoveryAttempt.id,
                RecoveryAttempt.step,
                RecoveryAttempt.due_at,
                RecoveryAttempt.why,
                RecoveryAttempt.tries,
            ).where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.status == StepStatus.SCHEDULED,
                RecoveryAttempt.origin != StepOrigin.OPERATOR,
            )
        )
    }
    for name, planned in wanted.items():
        row = scheduled.pop(name, None)
        if row is None:
            schedule(
                session,
                case,
                planned.kind,
                name,
                planned.due_at,
                origin=planned.origin,
                number=planned.number,
                template=planned.template,
                why=planned.why,
            )
        elif row.tries:
            # Backing off after Stripe was unavailable: its next try is when
            # the backoff says, whatever moment the plan now names.
            continue
        elif row.due_at != planned.due_at or row.why != planned.why:
            session.execute(
                update(RecoveryAttempt)
                .where(RecoveryAttempt.id == row.id, RecoveryAttempt.status == StepStatus.SCHEDULED)
                .values(due_at=planned.due_at, why=planned.why)
            )
    if scheduled:
        session.execute(
            update(RecoveryAttempt)
            .where(
                RecoveryAttempt.id.in_([row.id for row in scheduled.values()]),
                RecoveryAttempt.status == StepStatus.SCHEDULED,
            )
            .values(status=StepStatus.CANCELED, outcome=StepOutcome.CANCELED)
        )


def retry_due_or_running(session: Session, case_id: int, now: datetime) -> bool:
    """Whether a retry is due, under way, or a new card's (which runs at once)."""
    found = session.scalar(
        select(RecoveryAttempt.id).where(
            RecoveryAttempt.case_id == case_id,
            RecoveryAttempt.kind == StepKind.RETRY,
            RecoveryAttempt.status.in_(LIVE),
            (RecoveryAttempt.origin == StepOrigin.CARD_UPDATE)
            | (RecoveryAttempt.due_at <= now)
            | (RecoveryAttempt.status != StepStatus.SCHEDULED),
        )
    )
    return found is not None


# -- claiming ----------------------------------------------------------------------


def _due_now(now: datetime) -> list[tuple[ColumnElement[bool], Any]]:
    """What makes a step claimable, each with the order it is claimed in."""
    return [
        # Leases that ran out first: their worker died mid-step.
        (
            RecoveryAttempt.status.in_((StepStatus.CLAIMED, StepStatus.EXECUTING))
            & (RecoveryAttempt.lease_until <= now),
            RecoveryAttempt.lease_until,
        ),
        (
            (RecoveryAttempt.status == StepStatus.SCHEDULED) & (RecoveryAttempt.due_at <= now),
            RecoveryAttempt.due_at,
        ),
    ]


def due(now: datetime) -> ColumnElement[bool]:
    """The steps claim_due takes at `now`."""
    return or_(*(condition for condition, _ in _due_now(now)))


def claim_due(now: datetime, limit: int, lease: timedelta) -> list[Claim]:
    """Claim up to `limit` steps that are due, or whose lease ran out."""
    claims: list[Claim] = []
    with session_scope() as session:
        postgres = dialect_of(session) == "postgresql"
        for condition, order in _due_now(now):
            wanted = limit - len(claims)
            if wanted <= 0:
                break
            ids = select(RecoveryAttempt.id).where(condition).order_by(order).limit(wanted)
            if postgres:
                ids = ids.with_for_update(skip_locked=True)
            rows = list(
                session.execute(
                    _claiming(now, lease, RecoveryAttempt.id.in_(ids.scalar_subquery()))
                ).all()
            )
            # RETURNING comes in table order, not the subquery's: put the steps
            # back in due order, a retry before an email due with it, so a
            # retry that recovers the case runs before a reminder would go out.
            rows.sort(key=lambda row: (row.due_at, row.kind != StepKind.RETRY))
            claims.extend((row.id, row.claims) for row in rows)
    return claims


def _claiming(now: datetime, lease: timedelta, *where: ColumnElement[bool]) -> Update:
    """The one claim statement: leased to the caller, claim number bumped."""
    return (
        update(RecoveryAttempt)
        .where(*where)
        .values(
            status=StepStatus.CLAIMED,
            lease_until=now + lease,
            claims=RecoveryAttempt.claims + 1,
        )
        .returning(
            RecoveryAttempt.id, RecoveryAttempt.claims, RecoveryAttempt.due_at, RecoveryAttempt.kind
        )
    )


def claim_named(case_id: int, name: str, now: datetime, lease: timedelta) -> Claim | None:
    """Claim one named step of a case (an operator's retry), if still scheduled."""
    with session_scope() as session:
        row = session.execute(
            _claiming(
                now,
                lease,
                RecoveryAttempt.case_id == case_id,
                RecoveryAttempt.step == name,
                RecoveryAttempt.status == StepStatus.SCHEDULED,
            )
        ).one_or_none()
    return (row.id, row.claims) if row else None


def dispatch(now: datetime, settings: Settings, hand_off: Callable[[list[Claim]], None]) -> int:
    """Claim every due step, batch by batch, and hand each batch off; returns how
    many. A hand-off that fails leaves its steps to be claimed after the lease."""
    lease = timedelta(seconds=settings.step_lease_seconds)
    total = 0
    while True:
        batch = claim_due(now, settings.dispatch_batch_size, lease)
        if batch:
            hand_off(batch)
            total += len(batch)
        if len(batch) < settings.dispatch_batch_size:
            return total


# -- executing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A step as its executor holds it, for the claim it was handed."""

    id: int
    claim: int
    kind: StepKind
    origin: StepOrigin
    number: int | None
    template: str | None
    forced: bool
    name: str
    case_id: int
    key: str
    tries: int

    @property
    def label(self) -> str:
        return label(self.origin, self.kind, self.number)


def start(claim: Claim, now: datetime, lease: timedelta) -> Step | None:
    """Begin executing a claimed step; None if the claim is no longer current."""
    step_id, number = claim
    with session_scope() as session:
        row = session.execute(
            update(RecoveryAttempt)
            .where(
                RecoveryAttempt.id == step_id,
                RecoveryAttempt.claims == number,
                RecoveryAttempt.status == StepStatus.CLAIMED,
            )
            .values(status=StepStatus.EXECUTING, lease_until=now + lease)
            .returning(
                RecoveryAttempt.kind,
                RecoveryAttempt.origin,
                RecoveryAttempt.number,
                RecoveryAttempt.template,
                RecoveryAttempt.forced,
                RecoveryAttempt.step,
                RecoveryAttempt.case_id,
                RecoveryAttempt.idempotency_key,
                RecoveryAttempt.tries,
            )
        ).one_or_none()
    if row is None:
        return None
    return Step(
        id=step_id,
        claim=number,
        kind=row.kind,
        origin=row.origin,
        number=row.number,
        template=row.template,
        forced=row.forced,
        name=row.step,
        case_id=row.case_id,
        key=row.idempotency_key,
        tries=row.tries,
    )


def finish(session: Session, step: Step, now: datetime, outcome: str, **fields: Any) -> bool:
    """Mark the step done with its outcome, if this claim still holds it."""
    done = rows_changed(
        session.execute(
            _held(step).values(status=StepStatus.DONE, outcome=outcome, executed_at=now, **fields)
        )
    )
    if not done:
        log.warning("step_lost_lease", step_id=step.id, outcome=outcome)
    return bool(done)


def renew(session: Session, step: Step, until: datetime) -> None:
    """Extend this claim's lease, right before a call that must not be repeated
    by another worker while it may still be open."""
    session.execute(_held(step).values(lease_until=until))


def _held(step: Step) -> Update:
    """An update of the step's row while this claim still executes it."""
    return update(RecoveryAttempt).where(
        RecoveryAttempt.id == step.id,
        RecoveryAttempt.claims == step.claim,
        RecoveryAttempt.status == StepStatus.EXECUTING,
    )


MAX_TRANSIENT_TRIES = 12
# 30 s, 1 min, 2 min, … at most half an hour between tries of a step.
STEP_RETRY_CAP = timedelta(minutes=30)


def back_off(session: Session, step: Step, now: datetime, error: str) -> StepOutcome:
    """Stripe was unavailable: the step is due again after a doubling wait
    from `now`, with the same key; after the last try it fails."""
    tries = step.tries + 1
    if tries >= MAX_TRANSIENT_TRIES:
        finish(session, step, now, StepOutcome.FAILED_UNAVAILABLE, last_error=error)
        # At error level: Sentry hears of a step nothing will run again.
        log.error("step_given_up", tries=tries, error=error[:200])
        return StepOutcome.FAILED_UNAVAILABLE
    reschedule(session, step, now + clock.doubling(tries, STEP_RETRY_CAP), error, tries)
    log.warning("step_deferred", tries=tries)
    return StepOutcome.DEFERRED_UNAVAILABLE


def reschedule(session: Session, step: Step, due: datetime, error: str | None, tries: int) -> None:
    """Back to scheduled, due again at `due` (a backoff or a limit to wait for)."""
    session.execute(
        update(RecoveryAttempt)
        .where(RecoveryAttempt.id == step.id, RecoveryAttempt.claims == step.claim)
        .values(
            status=StepStatus.SCHEDULED,
            due_at=due,
            lease_until=None,
            tries=tries,
            last_error=error,
        )
    )
