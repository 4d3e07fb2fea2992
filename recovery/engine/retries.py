"""One retry, or the final action, against Stripe, for a step already started.

A retry first reads the invoice as Stripe has it now, with its subscription
and the card it would be charged to (webhooks lag: it may be paid, voided,
its subscription ended, or the card changed since this was planned). It
charges only a card that may be charged off-session, within the card
networks' limits, with the step's own idempotency key: the same on every
re-execution, so Stripe charges at most once per step.

The case row stays locked from the last check through the pay call and the
recording of its answer. An operator's cancel or pause, and a webhook saying
the invoice was paid, therefore come either before the call (and no call is
made) or after it (and see its result, credited to this retry). The lock is
one row for the length of one request, bounded by the client's timeout,
which is shorter than the step's lease (see stripe_api.make_client).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import clock, stripe_api
from recovery.config import Settings
from recovery.db import session_scope
from recovery.engine import cases, planner, plans, steps
from recovery.engine.classify import Failure, classify
from recovery.engine.events import recovery_path_of_payment
from recovery.models import (
    AuditEntry,
    CardAttempt,
    CardAttemptSource,
    CaseStatus,
    Customer,
    RecoveryCase,
    RecoveryPath,
    StepKind,
    StepOrigin,
    StepOutcome,
)
from recovery.observability import scrub_text

log = structlog.get_logger("recovery.retries")

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


def _path_of(step: steps.Step) -> RecoveryPath:
    if step.origin is StepOrigin.BACKUP_CARD:
        return RecoveryPath.BACKUP_CARD
    return RecoveryPath.CARD_UPDATE if step.origin is StepOrigin.CARD_UPDATE else RecoveryPath.RETRY


def settle_from_stripe(
    session: Session,
    case: RecoveryCase,
    invoice: dict[str, Any],
    now: datetime,
    step: steps.Step | None = None,
) -> StepOutcome | None:
    """Close the case if Stripe says its invoice is settled or its subscription
    ended; the outcome for the step that found it, or None if neither."""
    status = _CLOSING.get(invoice.get("status") or "")
    if status is CaseStatus.RECOVERED:
        # A retry claimed before may itself have charged (its worker died
        # waiting for the answer): then the recovery is that retry's.
        ours = step is not None and step.kind is StepKind.RETRY and step.claim > 1
        fields: dict[str, Any] = {
            "amount_recovered": invoice.get("amount_paid"),
            "recovery_path": _path_of(step) if ours and step else None,
            "recovered_by_step": step.label if ours and step else None,
        }
        if not ours:
            fields["recovery_path"] = recovery_path_of_payment(session, case)
        if not cases.close(session, case, status, now, **fields) and ours and step:
            cases.credit_recovery(session, case, _path_of(step), step.label)
        return _FOUND["paid"]
    if status is not None:
        cases.close(session, case, status, now)
        return _FOUND[invoice.get("status") or ""]
    if invoice.get("status") != "open":
        return StepOutcome.INVOICE_NOT_OPEN
    if stripe_api.subscription_canceled(invoice):
        cases.close(session, case, CaseStatus.CANCELED, now)
        return StepOutcome.SUBSCRIPTION_CANCELED
    return None


def _saved_card(session: Session, case: RecoveryCase, step: steps.Step) -> str | None:
    """The card the customer saved through our link, which a retry on a card
    update pays with explicitly: an invoice's own default would win over it."""
    if step.origin is not StepOrigin.CARD_UPDATE or case.customer_id is None:
        return None
    customer = session.get(Customer, case.customer_id)
    return customer.saved_payment_method if customer else None


def _ours_already(case: RecoveryCase, step: steps.Step) -> bool:
    """A retry claimed before, whose case was since recovered: the same
    reading settle_from_stripe makes of an invoice found paid."""
    return (
        step.kind is StepKind.RETRY
        and step.claim > 1
        and case.status is CaseStatus.RECOVERED
        and case.recovery_path is RecoveryPath.PAID_ELSEWHERE
    )


def _nothing_to_do(
    session: Session,
    case: RecoveryCase,
    step: steps.Step,
    now: datetime,
    invoice: dict[str, Any] | None = None,
) -> StepOutcome | None:
    """Finish the step, and say with what, when the invoice as Stripe has it
    now or the case (paused, closed) leaves it nothing to do."""
    found = settle_from_stripe(session, case, invoice, now, step) if invoice else None
    if found is None and _ours_already(case, step):
        # invoice.paid closed the case while this retry's first worker, dead
        # waiting for Stripe's answer, had charged: the recovery is the retry's.
        cases.credit_recovery(session, case, _path_of(step), step.label)
        found = _FOUND["paid"]
    found = found or cases.idle_outcome(case)
    if found is not None:
        steps.finish(session, step, now, found)
    return found


def execute_retry(step: steps.Step, now: datetime, settings: Settings) -> StepOutcome:
    if step.origin is StepOrigin.BACKUP_CARD:
        return execute_backup_retry(step, now, settings)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        done = _nothing_to_do(session, case, step, now)
        if done is not None:
            return done
        invoice_id, saved = case.invoice_id, _saved_card(session, case, step)
    try:
        invoice = stripe_api.retrieve_invoice_state(invoice_id)
        card = (
            stripe_api.card_of(stripe_api.retrieve_payment_method(saved))
            if saved
            else stripe_api.card_to_charge(invoice)
        )
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        # Paid, ended or changed at Stripe, or paused or closed here meanwhile.
        done = _nothing_to_do(session, case, step, now, invoice)
        if done is not None:
            return done
        if not step.forced and not _may_charge(case, card, step):
            steps.finish(session, step, now, StepOutcome.BLOCKED_SAME_CARD)
            session.add(
                AuditEntry.of(case, "engine", "retry_blocked", reason="the declined card again")
            )
            cases.replan(session, case, now, settings)
            return StepOutcome.BLOCKED_SAME_CARD
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
        # From here the call may reach Stripe: no other worker may send this
        # key until it has answered, so the lease runs from now.
        steps.renew(session, step, clock.now() + timedelta(seconds=settings.step_lease_seconds))
        extra = {"payment_method": saved} if saved else {}
        try:
            paid = stripe_api.pay_invoice(invoice_id, step.key, **extra)
        except stripe_api.CardDeclined as declined:
            steps.finish(
                session,
                step,
                now,
                StepOutcome.DECLINED,
                decline_code=declined.decline.decline_code,
                slot=_learning_slot(session, case, step, now),
            )
            cases.record_decline(session, case, declined.decline, step.key, now, settings)
            log.info("retry_declined", decline_code=declined.decline.decline_code)
            return StepOutcome.DECLINED
        except stripe_api.StripeUnavailable as exc:
            return _transient(step, now, exc, session)
        except stripe_api.StripeRequestRejected as exc:
            return _rejected(session, case, step, now, exc)
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
            slot=_learning_slot(session, case, step, now),
        )
    log.info("retry_paid", invoice_id=invoice_id)
    return StepOutcome.PAID


def execute_backup_retry(step: steps.Step, now: datetime, settings: Settings) -> StepOutcome:
    """Charge another card saved on the customer: unexpired, not the card that
    declined nor the one Stripe charges, not tried for this case before, and
    one the networks allow. The case keeps its own card's facts; the other
    card's attempt goes on that card's own ledger."""
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        done = _nothing_to_do(session, case, step, now)
        if done is not None:
            return done
        invoice_id, customer_id = case.invoice_id, case.stripe_customer_id
    try:
        invoice = stripe_api.retrieve_invoice_state(invoice_id)
        charged = stripe_api.card_to_charge(invoice)
        saved = stripe_api.list_cards(customer_id) if customer_id else []
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        done = _nothing_to_do(session, case, step, now, invoice)
        if done is not None:
            return done
        card = _backup_card(session, case, saved, charged, now, settings)
        if card is None:
            steps.finish(session, step, now, StepOutcome.NO_BACKUP_CARD)
            session.add(AuditEntry.of(case, "engine", "no_backup_card"))
            cases.replan(session, case, now, settings)
            return StepOutcome.NO_BACKUP_CARD
        steps.renew(session, step, clock.now() + timedelta(seconds=settings.step_lease_seconds))
        try:
            paid = stripe_api.pay_invoice(
                invoice_id, step.key, payment_method=card.payment_method_id
            )
        except stripe_api.CardDeclined as declined:
            code = declined.decline.decline_code
            steps.finish(session, step, now, StepOutcome.DECLINED, decline_code=code)
            # Stripe numbers this attempt too: its webhook then finds it
            # recorded, and the case keeps its own card's decline.
            case.attempt_count += 1
            stop = classify(
                Failure(
                    decline_code=code,
                    advice_code=declined.decline.advice_code,
                    network_advice_code=declined.decline.network_advice_code,
                    network_decline_code=declined.decline.network_decline_code,
                    card_brand=card.brand,
                )
            ).stops_card
            planner.record_card_attempt(
                session, case, step.key, now, CardAttemptSource.RECOVERY, stop,
                fingerprint=card.fingerprint, brand=card.brand,
            )  # fmt: skip
            session.add(
                AuditEntry.of(case, "engine", "backup_card_declined", brand=card.brand, code=code)
            )
            cases.replan(session, case, now, settings)
            return StepOutcome.DECLINED
        except stripe_api.StripeUnavailable as exc:
            return _transient(step, now, exc, session)
        except stripe_api.StripeRequestRejected as exc:
            return _rejected(session, case, step, now, exc)
        planner.record_card_attempt(
            session, case, step.key, now, CardAttemptSource.RECOVERY, False,
            fingerprint=card.fingerprint, brand=card.brand,
        )  # fmt: skip
        cases.close(
            session,
            case,
            CaseStatus.RECOVERED,
            now,
            amount_recovered=paid.get("amount_paid"),
            recovery_path=RecoveryPath.BACKUP_CARD,
            recovered_by_step=step.label,
        )
        steps.finish(
            session, step, now, StepOutcome.PAID, amount=paid.get("amount_paid"),
            currency=case.currency,
        )  # fmt: skip
    log.info("backup_card_paid", invoice_id=invoice_id)
    return StepOutcome.PAID


def _backup_card(
    session: Session,
    case: RecoveryCase,
    saved: list[stripe_api.Card],
    charged: stripe_api.Card | None,
    now: datetime,
    settings: Settings,
) -> stripe_api.Card | None:
    tried = set(
        session.scalars(
            select(CardAttempt.fingerprint).where(
                CardAttempt.reference.in_(steps.keys_of(session, case, StepOrigin.BACKUP_CARD))
            )
        )
    )
    excluded = {case.card_fingerprint, charged.fingerprint if charged else None, *tried}
    for card in saved:
        if not card.payment_method_id or not card.fingerprint or card.fingerprint in excluded:
            continue
        if (card.exp_year or 0, card.exp_month or 0) < (now.year, now.month):
            continue
        attempts, stopped = planner.card_history(session, card.fingerprint)
        windows = plans.limits(card.brand, settings.visa_max_attempts_30d)
        if plans.earliest_allowed([t for t in attempts if t <= now], windows, now, stopped) == now:
            return card
    return None


def _learning_slot(
    session: Session, case: RecoveryCase, step: steps.Step, now: datetime
) -> str | None:
    """The slot the learner counts this answer in: only the plan's own retries
    on the card that declined teach when that card's kind of decline pays
    (a new card or an operator's say-so would teach nothing about timing)."""
    if step.origin is not StepOrigin.PLAN or step.forced:
        return None
    return planner.slot_of_retry(session, case, now)


def _may_charge(case: RecoveryCase, card: stripe_api.Card | None, step: steps.Step) -> bool:
    """Another card than the one that declined may be charged. The same card
    never for a retry on a card update (the new card is not the one Stripe
    will charge: a subscription's own default wins over the customer's), nor
    off-session for a decline only the customer can fix."""
    if card is not None and card.fingerprint and card.fingerprint != case.card_fingerprint:
        return True
    if step.origin is StepOrigin.CARD_UPDATE:
        return False
    return classify(planner.failure_of(case)).may_retry_card


def _transient(
    step: steps.Step, now: datetime, exc: Exception, session: Session | None = None
) -> StepOutcome:
    """Stripe was unavailable: try again with backoff from now, the same key."""
    error = scrub_text(f"{type(exc).__name__}: {exc}")[:500]
    if session is not None:
        return steps.back_off(session, step, clock.now(), error)
    with session_scope() as own:
        return steps.back_off(own, step, clock.now(), error)


def _rejected(
    session: Session, case: RecoveryCase, step: steps.Step, now: datetime, exc: Exception
) -> StepOutcome:
    """Stripe refused the request: settled meanwhile, or an operator must look."""
    try:
        invoice: dict[str, Any] | None = stripe_api.retrieve_invoice_state(case.invoice_id)
    except stripe_api.StripeFailure:
        invoice = None
    settled = settle_from_stripe(session, case, invoice, now, step) if invoice else None
    if settled is not None:
        steps.finish(session, step, now, settled)
        return settled
    case.flag_reason = case.flag_reason or f"retry rejected by Stripe: {type(exc).__name__}"
    steps.finish(session, step, now, StepOutcome.REJECTED, last_error=scrub_text(str(exc))[:500])
    log.error("retry_rejected", error=type(exc).__name__)
    return StepOutcome.REJECTED


def execute_final(step: steps.Step, now: datetime, settings: Settings) -> StepOutcome:
    """The plan ran out: cancel the subscription or mark the invoice
    uncollectible, with the case row held as for a retry."""
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        done = _nothing_to_do(session, case, step, now)
        if done is not None:
            return done
        action = planner.plan_for(case.category or "", settings).final_action
        invoice_id, subscription_id = case.invoice_id, case.subscription_id
    try:
        invoice = stripe_api.retrieve_invoice_state(invoice_id)
    except stripe_api.StripeUnavailable as exc:
        return _transient(step, now, exc)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        done = _nothing_to_do(session, case, step, now, invoice)
        if done is not None:
            return done
        steps.renew(session, step, clock.now() + timedelta(seconds=settings.step_lease_seconds))
        status: CaseStatus | None = None
        try:
            if action is plans.FinalAction.CANCEL_SUBSCRIPTION and subscription_id:
                stripe_api.cancel_subscription(subscription_id, step.key)
                status = CaseStatus.CANCELED
            elif action is plans.FinalAction.MARK_UNCOLLECTIBLE:
                stripe_api.mark_uncollectible(invoice_id, step.key)
                status = CaseStatus.UNCOLLECTIBLE
        except stripe_api.StripeUnavailable as exc:
            return _transient(step, now, exc, session)
        except stripe_api.StripeRequestRejected as exc:
            return _rejected(session, case, step, now, exc)
        outcome = StepOutcome(action.value)
        if status is not None:
            cases.close(session, case, status, now, actor="engine", final_action=action.value)
        session.add(AuditEntry.of(case, "engine", "final_action", final_action=action.value))
        steps.finish(session, step, now, outcome)
    return outcome
