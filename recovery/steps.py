"""Due steps: claim them safely, then execute each exactly once.

    scheduled ─claim─▶ claimed ─start─▶ executing ─▶ done
        ▲   (lease ran out: claimed again, claims + 1)  │
        └──────── transient Stripe error, backoff ──────┘

A claim is one UPDATE over `FOR UPDATE SKIP LOCKED` rows on PostgreSQL (one
statement under SQLite's single writer lock), so concurrent dispatchers never
take the same step. Each claim bumps `claims`; an executor starts and finishes
a step only for the claim it was handed, so a redelivered task or a second beat
does nothing. A worker that dies mid-step loses its lease and the step is
claimed again: a retry then re-sends the same idempotency key, and Stripe
answers with the first charge's result instead of charging twice.
No database lock is held while Stripe is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select, update

from recovery import clock, delivery, engine, events, outbox, ratelimit, stripe_api
from recovery.classify import classify
from recovery.config import Settings
from recovery.db import session_scope
from recovery.events import close_case
from recovery.models import (
    CaseStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepStatus,
)
from recovery.observability import scrub_text

log = structlog.get_logger("recovery.steps")

Claim = tuple[int, int]  # (step id, claim number)
MAX_TRANSIENT_TRIES = 12


# 30 s, 1 min, 2 min, … at most half an hour between tries of a step.
STEP_RETRY_CAP = timedelta(minutes=30)


# -- claiming -------------------------------------------------------------------


def claim_due(now: datetime, limit: int, lease: timedelta) -> list[Claim]:
    """Claim up to `limit` steps that are due, or whose lease ran out."""
    claims: list[Claim] = []
    with session_scope() as session:
        postgres = session.get_bind().dialect.name == "postgresql"
        for due in (
            # Leases that ran out first: their worker died mid-step.
            (
                RecoveryAttempt.status.in_((StepStatus.CLAIMED.value, StepStatus.EXECUTING.value))
                & (RecoveryAttempt.lease_until <= now),
                RecoveryAttempt.lease_until,
            ),
            (
                (RecoveryAttempt.status == StepStatus.SCHEDULED.value)
                & (RecoveryAttempt.due_at <= now),
                RecoveryAttempt.due_at,
            ),
        ):
            wanted = limit - len(claims)
            if wanted <= 0:
                break
            ids = select(RecoveryAttempt.id).where(due[0]).order_by(due[1]).limit(wanted)
            if postgres:
                ids = ids.with_for_update(skip_locked=True)
            rows = session.execute(
                _claiming(now, lease, RecoveryAttempt.id.in_(ids.scalar_subquery()))
            ).all()
            # RETURNING comes in table order, not the subquery's: put the steps
            # back in due order, a retry before an email due with it, so a
            # retry that recovers the case runs before a reminder would go out.
            rows.sort(key=lambda row: (row.due_at, row.kind != StepKind.RETRY.value))
            claims.extend((row.id, row.claims) for row in rows)
    return claims


def _claiming(now: datetime, lease: timedelta, *where):
    """The one claim statement: leased to the caller, claim number bumped."""
    return (
        update(RecoveryAttempt)
        .where(*where)
        .values(
            status=StepStatus.CLAIMED.value,
            lease_until=now + lease,
            claims=RecoveryAttempt.claims + 1,
        )
        .returning(
            RecoveryAttempt.id, RecoveryAttempt.claims, RecoveryAttempt.due_at, RecoveryAttempt.kind
        )
    )


def claim_step(case_id: int, step: str, now: datetime, lease: timedelta) -> Claim | None:
    """Claim one named step of a case (an operator's retry), if still scheduled."""
    with session_scope() as session:
        row = session.execute(
            _claiming(
                now,
                lease,
                RecoveryAttempt.case_id == case_id,
                RecoveryAttempt.step == step,
                RecoveryAttempt.status == StepStatus.SCHEDULED.value,
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


# -- executing ------------------------------------------------------------------


@dataclass
class Step:
    id: int
    claim: int
    kind: str
    step: str
    case_id: int
    key: str
    tries: int


def _start(claim: Claim, now: datetime, lease: timedelta) -> Step | None:
    step_id, number = claim
    with session_scope() as session:
        row = session.execute(
            update(RecoveryAttempt)
            .where(
                RecoveryAttempt.id == step_id,
                RecoveryAttempt.claims == number,
                RecoveryAttempt.status == StepStatus.CLAIMED.value,
            )
            .values(status=StepStatus.EXECUTING.value, lease_until=now + lease)
            .returning(
                RecoveryAttempt.kind,
                RecoveryAttempt.step,
                RecoveryAttempt.case_id,
                RecoveryAttempt.idempotency_key,
                RecoveryAttempt.tries,
            )
        ).one_or_none()
    if row is None:
        return None
    return Step(step_id, number, row.kind, row.step, row.case_id, row.idempotency_key, row.tries)


def _finish(session, step: Step, now: datetime, outcome: str, **fields) -> bool:
    done = session.execute(
        update(RecoveryAttempt)
        .where(
            RecoveryAttempt.id == step.id,
            RecoveryAttempt.claims == step.claim,
            RecoveryAttempt.status == StepStatus.EXECUTING.value,
        )
        .values(status=StepStatus.DONE.value, outcome=outcome, executed_at=now, **fields)
    ).rowcount
    if not done:
        log.warning("step_lost_lease", step_id=step.id, outcome=outcome)
    return bool(done)


def _reschedule(session, step: Step, due: datetime, error: str | None, tries: int) -> None:
    session.execute(
        update(RecoveryAttempt)
        .where(RecoveryAttempt.id == step.id, RecoveryAttempt.claims == step.claim)
        .values(
            status=StepStatus.SCHEDULED.value,
            due_at=due,
            lease_until=None,
            tries=tries,
            last_error=error,
        )
    )


def _locked_case(session, case_id: int) -> RecoveryCase:
    return session.get(RecoveryCase, case_id, with_for_update=True)


def execute(claim: Claim, now: datetime, settings: Settings) -> str | None:
    """Run one claimed step; returns its outcome, or None if the claim is stale."""
    step = _start(claim, now, timedelta(seconds=settings.step_lease_seconds))
    if step is None:
        return None
    structlog.contextvars.bind_contextvars(step_id=step.id, case_id=step.case_id)
    try:
        return EXECUTORS[step.kind](step, now, settings)
    finally:
        structlog.contextvars.unbind_contextvars("step_id", "case_id")


def execute_all(claims: list[Claim], now: datetime, settings: Settings) -> dict[Claim, str | None]:
    return {claim: execute(claim, now, settings) for claim in claims}


# -- retries --------------------------------------------------------------------

_CLOSING = {
    "paid": CaseStatus.RECOVERED,
    "void": CaseStatus.VOIDED,
    "uncollectible": CaseStatus.UNCOLLECTIBLE,
}


def _close_from_invoice(session, case: RecoveryCase, invoice: dict, now: datetime, step) -> None:
    status = _CLOSING.get(invoice.get("status") or "")
    if status is CaseStatus.RECOVERED:
        # Found paid. A step claimed before may itself have charged (its worker
        # died waiting for the answer): then the recovery is that retry's.
        ours = step.kind == StepKind.RETRY.value and step.claim > 1
        close_case(
            session,
            case,
            status,
            now,
            amount_recovered=invoice.get("amount_paid"),
            recovery_path="retry" if ours else events.recovery_path_of_payment(session, case),
            recovered_by_step=step.step if ours else None,
        )
    elif status is not None:
        close_case(session, case, status, now)


def _current_card(invoice: dict) -> dict | None:
    """The card Stripe will charge: the invoice's, else the customer's default
    (expanded by retrieve_invoice_and_card; fetched only if they were not)."""
    pm = invoice.get("default_payment_method")
    customer = invoice.get("customer")
    if not pm and isinstance(customer, str):
        customer = stripe_api.retrieve_customer(customer)
    if not pm and isinstance(customer, dict):
        pm = (customer.get("invoice_settings") or {}).get("default_payment_method")
    if isinstance(pm, str):
        pm = stripe_api.retrieve_payment_method(pm)
    if not pm:
        return None
    return {"id": pm.get("id"), **(pm.get("card") or {})}


def execute_retry(step: Step, now: datetime, settings: Settings) -> str:
    with session_scope() as session:
        case = session.get(RecoveryCase, step.case_id)
        skip = None
        if case.status != CaseStatus.OPEN.value:
            skip = "skipped_closed"
        elif case.paused_at is not None:
            skip = "skipped_paused"
        if skip:
            _finish(session, step, now, skip)
            return skip
        invoice_id = case.invoice_id
    try:
        # Ask Stripe before charging: the invoice may be paid, voided, or
        # charged by someone else since we planned this.
        invoice = stripe_api.retrieve_invoice_and_card(invoice_id)
        card = _current_card(invoice) if invoice.get("status") == "open" else None
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    with session_scope() as session:
        case = _locked_case(session, step.case_id)
        if invoice.get("status") != "open":
            _close_from_invoice(session, case, invoice, now, step)
            outcome = f"invoice_{invoice.get('status')}"
            _finish(session, step, now, outcome)
            return outcome
        if card and card.get("fingerprint") and card["fingerprint"] != case.card_fingerprint:
            # A new card: its own ledger applies, the old card's decline does not.
            case.payment_method_id = card.get("id")
            case.card_fingerprint, case.card_brand = card["fingerprint"], card.get("brand")
            case.card_last4 = card.get("last4")
            case.card_exp_month, case.card_exp_year = card.get("exp_month"), card.get("exp_year")
        forced = step.step.startswith("retry:forced:")  # an operator, with a reason
        allowed = now if forced else engine.earliest_retry(session, case, now, settings)
        if allowed is None:
            _finish(session, step, now, "blocked_stop_code")
            engine.audit(session, case, "engine", "retry_blocked", reason="stop code on card")
            return "blocked_stop_code"
        if allowed > now:
            _reschedule(session, step, allowed, "network limit", step.tries)
            return "deferred_network_limit"
    ratelimit.acquire()
    try:
        paid = stripe_api.pay_invoice(invoice_id, step.key)
    except stripe_api.CardDeclined as declined:
        return _declined(step, now, settings, declined.decline)
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    except stripe_api.StripeRequestRejected as exc:
        return _rejected(step, now, exc)
    with session_scope() as session:
        case = _locked_case(session, step.case_id)
        engine.record_card_attempt(session, case, step.key, now, "recovery", False)
        close_case(
            session,
            case,
            CaseStatus.RECOVERED,
            now,
            amount_recovered=paid.get("amount_paid"),
            recovery_path="card_update" if step.step.startswith("retry:card-update") else "retry",
            recovered_by_step=step.step,
        )
        _finish(session, step, now, "paid", amount=paid.get("amount_paid"), currency=case.currency)
    log.info("retry_paid", invoice_id=invoice_id)
    return "paid"


def _declined(step: Step, now: datetime, settings: Settings, decline) -> str:
    with session_scope() as session:
        case = _locked_case(session, step.case_id)
        case.failure_code = decline.code
        case.decline_code = decline.decline_code
        case.advice_code = decline.advice_code
        case.network_advice_code = decline.network_advice_code
        case.network_decline_code = decline.network_decline_code
        case.needs_authentication = decline.decline_code == "authentication_required"
        case.last_failure_at = now
        case.attempt_count += 1
        stop = classify(engine.failure_of(case)).stops_card
        engine.record_card_attempt(
            session, case, decline.charge_id or step.key, now, "recovery", stop
        )
        _finish(session, step, now, "declined", decline_code=decline.decline_code)
        engine.plan_case(session, case, now, settings)
    log.info("retry_declined", decline_code=decline.decline_code)
    return "declined"


def _transient(step: Step, now: datetime, exc: Exception) -> str:
    tries = step.tries + 1
    with session_scope() as session:
        if tries >= MAX_TRANSIENT_TRIES:
            _finish(session, step, now, "failed_unavailable", last_error=scrub_text(str(exc))[:500])
            return "failed_unavailable"
        _reschedule(
            session,
            step,
            now + clock.doubling(tries, STEP_RETRY_CAP),
            scrub_text(str(exc))[:500],
            tries,
        )
    log.warning("retry_deferred", error=type(exc).__name__, tries=tries)
    return "deferred_unavailable"


def _rejected(step: Step, now: datetime, exc: Exception) -> str:
    with session_scope() as session:
        invoice_id = session.get(RecoveryCase, step.case_id).invoice_id
    try:
        invoice = stripe_api.retrieve_invoice(invoice_id)
    except stripe_api.StripeFailure:
        invoice = None
    with session_scope() as session:
        case = _locked_case(session, step.case_id)
        if invoice is not None and invoice.get("status") != "open":
            _close_from_invoice(session, case, invoice, now, step)
            _finish(session, step, now, f"invoice_{invoice.get('status')}")
            return f"invoice_{invoice.get('status')}"
        case.flag_reason = case.flag_reason or f"retry rejected by Stripe: {type(exc).__name__}"
        _finish(session, step, now, "rejected", last_error=scrub_text(str(exc))[:500])
    log.error("retry_rejected", error=type(exc).__name__)
    return "rejected"


# -- emails and the final action -------------------------------------------------


def execute_email(step: Step, now: datetime, settings: Settings) -> str:
    """Queue the step's email in the outbox and send it."""
    with session_scope() as session:
        case = _locked_case(session, step.case_id)
        if case.status != CaseStatus.OPEN.value or case.paused_at is not None:
            _finish(session, step, now, "skipped_closed")
            return "skipped_closed"
        retry_due = session.scalar(
            select(RecoveryAttempt.id).where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.kind == StepKind.RETRY.value,
                RecoveryAttempt.status.in_(engine.LIVE),
                RecoveryAttempt.step.like("retry:card-update:%")
                | (RecoveryAttempt.due_at <= now)
                | (RecoveryAttempt.status != StepStatus.SCHEDULED.value),
            )
        )
        if retry_due is not None:
            # A retry is due or under way (a new card's, or the plan's): its
            # result decides what to say, or whether to write at all.
            _reschedule(session, step, now + timedelta(minutes=15), None, step.tries)
            return "deferred_for_retry"
        template = step.step.split(":")[1] if ":" in step.step else step.step
        plan = engine.plan_for(engine.Category(case.category), settings)
        number = int(step.step.rsplit(":", 1)[-1]) if step.step[-1].isdigit() else 0
        if number < len(plan.emails):
            template = plan.emails[number].template
        key = outbox.case_key(case.id, step.step)
        outbox.enqueue(session, key, template, step.step, now, case_id=case.id)
        _finish(session, step, now, "queued")
    # Sent here and now; a failure is retried by the outbox, not by the step.
    return delivery.send_now(key, now, settings) or "queued"


def execute_final(step: Step, now: datetime, settings: Settings) -> str:
    with session_scope() as session:
        case = session.get(RecoveryCase, step.case_id)
        if case.status != CaseStatus.OPEN.value or case.paused_at is not None:
            _finish(session, step, now, "skipped_closed")
            return "skipped_closed"
        action = engine.plan_for(engine.Category(case.category), settings).final_action
        invoice_id, subscription_id = case.invoice_id, case.subscription_id
    try:
        if action is engine.plans.FinalAction.CANCEL_SUBSCRIPTION and subscription_id:
            stripe_api.cancel_subscription(subscription_id, step.key)
            status = CaseStatus.CANCELED
        elif action is engine.plans.FinalAction.MARK_UNCOLLECTIBLE:
            stripe_api.mark_uncollectible(invoice_id, step.key)
            status = CaseStatus.UNCOLLECTIBLE
        else:
            status = None
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    except stripe_api.StripeRequestRejected as exc:
        return _rejected(step, now, exc)
    with session_scope() as session:
        case = _locked_case(session, step.case_id)
        if status is not None:
            close_case(session, case, status, now)
        engine.audit(session, case, "engine", "final_action", final_action=action.value)
        _finish(session, step, now, action.value)
    return action.value


EXECUTORS: dict[str, Callable[[Step, datetime, Settings], str]] = {
    StepKind.RETRY.value: execute_retry,
    StepKind.EMAIL.value: execute_email,
    StepKind.FINAL.value: execute_final,
}
