"""One retry, or the final action, against Stripe, for a step already started.

A retry asks Stripe first (the invoice may be paid, voided or charged by
someone else since it was planned), checks the card networks' limits, then
calls Invoice.pay with the step's own idempotency key: the same on every
re-execution, so Stripe charges at most once per step. No database lock is
held while Stripe is called, and every change to the case goes through
engine/cases.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog

from recovery import clock, stripe_api
from recovery.config import Settings
from recovery.db import session_scope
from recovery.engine import cases, planner, plans, steps
from recovery.engine.events import recovery_path_of_payment
from recovery.models import (
    AuditEntry,
    CardAttemptSource,
    CaseStatus,
    RecoveryCase,
    RecoveryPath,
    StepKind,
    StepOrigin,
    StepOutcome,
)
from recovery.observability import scrub_text

log = structlog.get_logger("recovery.retries")

MAX_TRANSIENT_TRIES = 12
# 30 s, 1 min, 2 min, … at most half an hour between tries of a step.
STEP_RETRY_CAP = timedelta(minutes=30)

_CLOSING = {
    "paid": CaseStatus.RECOVERED,
    "void": CaseStatus.VOIDED,
    "uncollectible": CaseStatus.UNCOLLECTIBLE,
}
_FOUND = {
    "paid": StepOutcome.INVOICE_PAID,
    "void": StepOutcome.INVOICE_VOID,
    "uncollectible": StepOutcome.INVOICE_UNCOLLECTIBLE,
}


def _settled_outcome(invoice: dict[str, Any]) -> StepOutcome:
    return _FOUND.get(invoice.get("status") or "", StepOutcome.INVOICE_NOT_OPEN)


def _close_from_invoice(
    session: Any, case: RecoveryCase, invoice: dict[str, Any], now: datetime, step: steps.Step
) -> None:
    status = _CLOSING.get(invoice.get("status") or "")
    if status is CaseStatus.RECOVERED:
        # Found paid. A step claimed before may itself have charged (its worker
        # died waiting for the answer): then the recovery is that retry's.
        ours = step.kind is StepKind.RETRY and step.claim > 1
        cases.close(
            session,
            case,
            status,
            now,
            amount_recovered=invoice.get("amount_paid"),
            recovery_path=_path_of(step) if ours else recovery_path_of_payment(session, case),
            recovered_by_step=step.label if ours else None,
        )
    elif status is not None:
        cases.close(session, case, status, now)


def _path_of(step: steps.Step) -> RecoveryPath:
    return RecoveryPath.CARD_UPDATE if step.origin is StepOrigin.CARD_UPDATE else RecoveryPath.RETRY


def execute_retry(step: steps.Step, now: datetime, settings: Settings) -> StepOutcome:
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        idle = cases.idle_outcome(case)
        if idle is not None:
            steps.finish(session, step, now, idle)
            return idle
        invoice_id = case.invoice_id
    try:
        invoice = stripe_api.retrieve_invoice_and_card(invoice_id)
        card = stripe_api.card_to_charge(invoice) if invoice.get("status") == "open" else None
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        if invoice.get("status") != "open":
            _close_from_invoice(session, case, invoice, now, step)
            outcome = _settled_outcome(invoice)
            steps.finish(session, step, now, outcome)
            return outcome
        idle = cases.idle_outcome(case)
        if idle is not None:  # paused or closed while we asked Stripe
            steps.finish(session, step, now, idle)
            return idle
        if card is not None:
            cases.use_card(case, card)
        allowed = now if step.forced else planner.earliest_retry(session, case, now, settings)
        if allowed is None:
            steps.finish(session, step, now, StepOutcome.BLOCKED_STOP_CODE)
            session.add(AuditEntry.of(case, "engine", "retry_blocked", reason="stop code on card"))
            return StepOutcome.BLOCKED_STOP_CODE
        if allowed > now:
            steps.reschedule(session, step, allowed, "network limit", step.tries)
            return StepOutcome.DEFERRED_NETWORK_LIMIT
    try:
        paid = stripe_api.pay_invoice(invoice_id, step.key)
    except stripe_api.CardDeclined as declined:
        return _declined(step, now, settings, declined.decline)
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    except stripe_api.StripeRequestRejected as exc:
        return _rejected(step, now, exc)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        planner.record_card_attempt(session, case, step.key, now, CardAttemptSource.RECOVERY, False)
        cases.close(
            session,
            case,
            CaseStatus.RECOVERED,
            now,
            amount_recovered=paid.get("amount_paid"),
            recovery_path=_path_of(step),
            recovered_by_step=step.label,
        )
        steps.finish(
            session,
            step,
            now,
            StepOutcome.PAID,
            amount=paid.get("amount_paid"),
            currency=case.currency,
        )
    log.info("retry_paid", invoice_id=invoice_id)
    return StepOutcome.PAID


def _declined(
    step: steps.Step, now: datetime, settings: Settings, decline: stripe_api.Decline
) -> StepOutcome:
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        steps.finish(session, step, now, StepOutcome.DECLINED, decline_code=decline.decline_code)
        cases.record_decline(session, case, decline, step.key, now, settings)
    log.info("retry_declined", decline_code=decline.decline_code)
    return StepOutcome.DECLINED


def _transient(step: steps.Step, now: datetime, exc: Exception) -> StepOutcome:
    tries = step.tries + 1
    error = scrub_text(str(exc))[:500]
    with session_scope() as session:
        if tries >= MAX_TRANSIENT_TRIES:
            steps.finish(session, step, now, StepOutcome.FAILED_UNAVAILABLE, last_error=error)
            return StepOutcome.FAILED_UNAVAILABLE
        steps.reschedule(session, step, now + clock.doubling(tries, STEP_RETRY_CAP), error, tries)
    log.warning("retry_deferred", error=type(exc).__name__, tries=tries)
    return StepOutcome.DEFERRED_UNAVAILABLE


def _rejected(step: steps.Step, now: datetime, exc: Exception) -> StepOutcome:
    with session_scope() as session:
        invoice_id = cases.locked(session, step.case_id).invoice_id
    try:
        invoice: dict[str, Any] | None = stripe_api.retrieve_invoice(invoice_id)
    except stripe_api.StripeFailure:
        invoice = None
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        if invoice is not None and invoice.get("status") != "open":
            _close_from_invoice(session, case, invoice, now, step)
            outcome = _settled_outcome(invoice)
            steps.finish(session, step, now, outcome)
            return outcome
        case.flag_reason = case.flag_reason or f"retry rejected by Stripe: {type(exc).__name__}"
        steps.finish(
            session, step, now, StepOutcome.REJECTED, last_error=scrub_text(str(exc))[:500]
        )
    log.error("retry_rejected", error=type(exc).__name__)
    return StepOutcome.REJECTED


def execute_final(step: steps.Step, now: datetime, settings: Settings) -> StepOutcome:
    """The plan ran out: cancel the subscription or mark the invoice uncollectible."""
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        idle = cases.idle_outcome(case)
        if idle is not None:
            steps.finish(session, step, now, idle)
            return idle
        action = planner.plan_for(case.category or "", settings).final_action
        invoice_id, subscription_id = case.invoice_id, case.subscription_id
    status: CaseStatus | None = None
    try:
        if action is plans.FinalAction.CANCEL_SUBSCRIPTION and subscription_id:
            stripe_api.cancel_subscription(subscription_id, step.key)
            status = CaseStatus.CANCELED
        elif action is plans.FinalAction.MARK_UNCOLLECTIBLE:
            stripe_api.mark_uncollectible(invoice_id, step.key)
            status = CaseStatus.UNCOLLECTIBLE
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    except stripe_api.StripeRequestRejected as exc:
        return _rejected(step, now, exc)
    outcome = StepOutcome(action.value)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        if status is not None:
            cases.close(session, case, status, now, actor="engine")
        session.add(AuditEntry.of(case, "engine", "final_action", final_action=action.value))
        steps.finish(session, step, now, outcome)
    return outcome
