"""The case state machine: every move a recovery case makes is made here.

    open ──▶ recovered | canceled | voided | uncollectible
    canceled ──▶ recovered | voided | uncollectible   (a canceled subscription's
    uncollectible ──▶ recovered | voided               invoice can still be paid,
    recovered, voided: nothing follows                 voided or written off)

The moves form a lattice, so a case's final state is a function of the set
of events Stripe sent, not of their order: whichever of "subscription
deleted" and "invoice marked uncollectible" comes first, the case ends
uncollectible. A failure's facts merge the same way (the earliest failure
anchors the plan and names the first decline, the newest attempt says where
things stand), closed cases included, so late and repeated events add what
they know once and reopen nothing.

An operator may pause an open case and resume it; while it is paused nothing
happens to it. `may_act` is the one answer to "may anything still happen to
this case?", asked by every executor and by the outbox before they act. The
event handlers (events.py), the executors (retries.py, scheduler.py) and the
CLI change a case only through the functions below, inside the caller's
transaction and with the case row locked (`for_invoice`, `locked`, or the
CLI's `find_case`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import stripe_api
from recovery.business import announce
from recovery.config import Settings
from recovery.customers import links, outbox, standing
from recovery.db import insert_ignore
from recovery.engine import planner, steps
from recovery.engine.classify import Classification, Failure, classify
from recovery.models import (
    AuditEntry,
    CardAttemptSource,
    CaseStatus,
    LinkRevoked,
    RecoveryCase,
    RecoveryPath,
    StepKind,
    StepOrigin,
    StepOutcome,
)

log = structlog.get_logger("recovery.cases")

CASE_NEXT: dict[CaseStatus, frozenset[CaseStatus]] = {
    CaseStatus.OPEN: frozenset(
        {CaseStatus.RECOVERED, CaseStatus.CANCELED, CaseStatus.VOIDED, CaseStatus.UNCOLLECTIBLE}
    ),
    CaseStatus.UNCOLLECTIBLE: frozenset({CaseStatus.RECOVERED, CaseStatus.VOIDED}),
    CaseStatus.CANCELED: frozenset(
        {CaseStatus.RECOVERED, CaseStatus.VOIDED, CaseStatus.UNCOLLECTIBLE}
    ),
    CaseStatus.RECOVERED: frozenset(),
    CaseStatus.VOIDED: frozenset(),
}


class CaseRefused(Exception):
    """An operator's action the case's state does not allow; the message says why."""


def can_move(current: CaseStatus | str, target: CaseStatus | str) -> bool:
    return CaseStatus(target) in CASE_NEXT[CaseStatus(current)]


def may_act(case: RecoveryCase) -> bool:
    """Whether anything may still happen to the case: a retry, an email, the
    final action. Only an open case that no operator has paused."""
    return case.status is CaseStatus.OPEN and case.paused_at is None


def idle_outcome(case: RecoveryCase) -> StepOutcome | None:
    """The outcome of a step that found its case unable to act, or None."""
    if case.status is not CaseStatus.OPEN:
        return StepOutcome.SKIPPED_CLOSED
    if case.paused_at is not None:
        return StepOutcome.SKIPPED_PAUSED
    return None


# -- finding ---------------------------------------------------------------------------


def for_invoice(session: Session, invoice_id: str) -> RecoveryCase | None:
    """The invoice's case, locked for this transaction."""
    return session.scalars(
        select(RecoveryCase).where(RecoveryCase.invoice_id == invoice_id).with_for_update()
    ).one_or_none()


def locked(session: Session, case_id: int) -> RecoveryCase:
    case = session.get(RecoveryCase, case_id, with_for_update=True)
    if case is None:
        raise LookupError(f"no case {case_id}")
    return case


# -- opening and failures --------------------------------------------------------------


def open_case(
    session: Session, invoice: dict[str, Any], customer_id: int | None, now: datetime
) -> RecoveryCase:
    """The invoice's case, opened now unless another worker opened it first."""
    opened = insert_ignore(
        session,
        RecoveryCase,
        {
            "invoice_id": invoice["id"],
            "customer_id": customer_id,
            "stripe_customer_id": stripe_api.id_of(invoice.get("customer")),
            "subscription_id": stripe_api.subscription_of(invoice),
            "status": CaseStatus.OPEN,
            "livemode": bool(invoice.get("livemode")),
            "amount_due": invoice.get("amount_remaining", invoice.get("amount_due", 0)),
            "currency": (invoice.get("currency") or "usd").lower(),
            "attempt_count": 0,
            "needs_authentication": False,
            "opened_at": now,
            "updated_at": now,
        },
        ["invoice_id"],
    )
    case = for_invoice(session, invoice["id"])
    if case is None:  # pragma: no cover - the row was inserted or existed above
        raise LookupError(f"no case for {invoice['id']}")
    if opened:
        session.add(AuditEntry.of(case, "stripe", "case_opened"))
        announce.case_event(session, case, announce.OPENED, now)
        log.info("case_opened", case_id=case.id, invoice_id=case.invoice_id)
    return case


@dataclass(frozen=True)
class FailureReport:
    """An invoice payment failure as Stripe reported it."""

    event_id: str
    created: datetime
    attempt_count: int
    next_payment_attempt: datetime | None
    hosted_invoice_url: str | None
    amount_due: int | None
    action_required: bool = False


class Verdict(enum.StrEnum):
    RECORDED = "recorded"
    ALREADY_RECORDED = "already_recorded"  # this attempt and its anchor are known
    STALE = "stale"  # neither newer nor earlier than what is known: nothing to add


def record_failure(
    session: Session,
    case: RecoveryCase,
    report: FailureReport,
    read_details: Callable[[], stripe_api.DeclineDetails],
    now: datetime,
    settings: Settings,
) -> Verdict:
    """Merge a failure Stripe reported into the case: the earliest failure
    anchors the plan and names the first decline, the newest attempt sets the
    current decline; the card's ledger; then the plan, if the case may act.
    Any order of the same failures gives the same case. `read_details` is
    not called for an attempt already recorded."""
    known = case.last_failure_at is not None
    # Stripe numbers an invoice's attempts; two reports of one attempt (failed,
    # then action required) describe the same charge, so the number decides.
    newer = not known or report.attempt_count > case.attempt_count
    earlier = case.first_failed_at is None or report.created < case.first_failed_at
    # Stripe reports one attempt twice when it needs the customer: failed,
    # then action required; the second adds that fact to the same attempt.
    adds_action = (
        report.action_required
        and not case.needs_authentication
        and report.attempt_count == case.attempt_count
    )
    adds_fact = newer or earlier or adds_action
    if not adds_fact and known and report.attempt_count == case.attempt_count:
        return Verdict.ALREADY_RECORDED

    # A stale failure changes no field of the case, but its charge happened:
    # the card networks count it, and a failure that needs an operator flags
    # the case whenever it arrives.
    details = read_details()
    reading = classify(_failure(details, report.action_required))
    if earlier:
        case.first_failed_at = report.created
        case.first_decline_code = details.decline_code or details.failure_code
        case.first_category = reading.category.value
    if newer:
        case.last_failure_at = report.created
        case.attempt_count = report.attempt_count
        case.next_payment_attempt = report.next_payment_attempt
        case.hosted_invoice_url = report.hosted_invoice_url or case.hosted_invoice_url
        if report.amount_due is not None and case.status is CaseStatus.OPEN:
            case.amount_due = report.amount_due
        for key in _DECLINE_COLUMNS:
            setattr(case, key, getattr(details, key))
        case.needs_authentication = (
            report.action_required or details.decline_code == "authentication_required"
        )
    elif adds_action:
        case.needs_authentication = True
    planner.record_card_attempt(
        session,
        case,
        details.charge_id,
        report.created,
        CardAttemptSource.STRIPE,
        reading.stops_card,
        fingerprint=details.card_fingerprint,
        brand=details.card_brand,
    )
    planner.flag_if_needed(session, case, reading)
    replan(session, case, now, settings)
    if not adds_fact:
        return Verdict.STALE
    session.add(
        AuditEntry.of(
            case,
            "stripe",
            "payment_failed",
            event_id=report.event_id,
            decline_code=case.decline_code,
            attempt_count=case.attempt_count,
        )
    )
    log.info(
        "failure_recorded",
        case_id=case.id,
        invoice_id=case.invoice_id,
        decline_code=case.decline_code,
        attempt_count=case.attempt_count,
    )
    return Verdict.RECORDED


# The columns a newer failure's decline replaces, all of them: a code the
# newer decline lacks must not survive from an older one.
_DECLINE_COLUMNS = (
    "charge_id",
    "payment_intent_id",
    "failure_code",
    "decline_code",
    "advice_code",
    "network_advice_code",
    "network_decline_code",
    "outcome_type",
    "payment_method_id",
    "payment_method_type",
    "card_brand",
    "card_fingerprint",
    "card_last4",
    "card_exp_month",
    "card_exp_year",
)


def _failure(details: stripe_api.DeclineDetails, action_required: bool) -> Failure:
    needs = action_required or details.decline_code == "authentication_required"
    return planner.failure_of(details, needs_authentication=needs)


def record_decline(
    session: Session,
    case: RecoveryCase,
    decline: stripe_api.Decline,
    reference: str,
    now: datetime,
    settings: Settings,
) -> None:
    """Our own retry was declined: its codes replace the case's, then replan."""
    case.failure_code = decline.code
    case.decline_code = decline.decline_code
    case.advice_code = decline.advice_code
    case.network_advice_code = decline.network_advice_code
    case.network_decline_code = decline.network_decline_code
    case.needs_authentication = decline.decline_code == "authentication_required"
    case.last_failure_at = now
    case.attempt_count += 1
    reading = classify(planner.failure_of(case))
    planner.record_card_attempt(
        session,
        case,
        decline.charge_id or reference,
        now,
        CardAttemptSource.RECOVERY,
        reading.stops_card,
    )
    planner.flag_if_needed(session, case, reading)
    replan(session, case, now, settings)


def use_card(case: RecoveryCase, card: stripe_api.Card) -> bool:
    """Stripe will now charge another card than the one that declined: its own
    ledger applies from here on. True if the card changed."""
    if not card.fingerprint or card.fingerprint == case.card_fingerprint:
        return False
    case.payment_method_id = card.payment_method_id
    case.card_fingerprint, case.card_brand = card.fingerprint, card.brand
    case.card_last4 = card.last4
    case.card_exp_month, case.card_exp_year = card.exp_month, card.exp_year
    return True


def card_updated(
    session: Session,
    case: RecoveryCase,
    now: datetime,
    settings: Settings,
    **detail: Any,
) -> bool:
    """The customer changed the card (the customer's row already says when):
    the plan retries at once if the change came after the last decline."""
    session.add(AuditEntry.of(case, "stripe", "card_updated", **detail))
    if not may_act(case):
        return False
    replan(session, case, now, settings)
    return steps.has_live_retry(session, case, StepOrigin.CARD_UPDATE)


def replan(session: Session, case: RecoveryCase, now: datetime, settings: Settings) -> None:
    """Classify the case again and, if it may act, make its steps what its facts call for."""
    reading = planner.classify_case(session, case, settings)
    if may_act(case):
        final_at = planner.schedule_next(session, case, reading, now, settings)
        _tell_business(session, case, reading, final_at, now, settings)


def customer_action(case: RecoveryCase, reading: Classification) -> str | None:
    """What only the customer can do for the case now, if anything."""
    if case.flag_reason is not None or not reading.contacts_customer:
        return None
    if case.needs_authentication:
        return standing.AUTHENTICATE
    return None if reading.may_retry_card else standing.UPDATE_CARD


def _tell_business(
    session: Session,
    case: RecoveryCase,
    reading: Classification,
    final_at: datetime | None,
    now: datetime,
    settings: Settings,
) -> None:
    """Announce what changed for the business's app: what the customer must
    now do, and when the plan's final action comes (its grace period)."""
    action = customer_action(case, reading)
    if action != case.customer_action:
        case.customer_action = action
        if action is not None:
            announce.case_event(
                session,
                case,
                announce.CUSTOMER_ACTION_REQUIRED,
                now,
                action=action,
                why=reading.why,
            )
    if final_at != case.final_action_at:
        case.final_action_at = final_at
        if final_at is not None:
            announce.case_event(
                session,
                case,
                announce.FINAL_ACTION_SCHEDULED,
                now,
                final_action=planner.plan_for(reading.category, settings).final_action.value,
                at=announce.iso(final_at),
            )


# -- closing ---------------------------------------------------------------------------


def close(
    session: Session,
    case: RecoveryCase,
    status: CaseStatus,
    now: datetime,
    actor: str = "stripe",
    final_action: str | None = None,
    **fields: Any,
) -> bool:
    """Move the case to a closed state if CASE_NEXT allows it: its steps are
    canceled, its links revoked, a reminded customer is thanked, the business
    told (`final_action`: the plan's, when it is what closed the case)."""
    if not can_move(case.status, status):
        return False
    previous = case.status
    case.status = status
    case.closed_at = now
    for key, value in fields.items():
        setattr(case, key, value)
    steps.cancel(session, case)
    links.revoke_case_links(session, case.id, now, LinkRevoked.CLOSED)
    if status is CaseStatus.RECOVERED:
        outbox.on_case_recovered(session, case, now)
        announce.case_event(
            session,
            case,
            announce.RECOVERED,
            now,
            how=case.recovery_path.value if case.recovery_path else None,
            amount_recovered=case.amount_recovered,
            previous_status=previous.value,
        )
    else:
        announce.case_event(
            session,
            case,
            announce.CLOSED,
            now,
            reason=status.value,
            by=actor if actor in ("stripe", "engine") else "operator",
            final_action=final_action,
        )
    session.add(AuditEntry.of(case, actor, f"case_{status.value}", previous=previous.value))
    log.info("case_closed", case_id=case.id, invoice_id=case.invoice_id, status=status.value)
    return True


def credit_recovery(
    session: Session, case: RecoveryCase, path: RecoveryPath, step_label: str
) -> bool:
    """A recovery first put down as paid elsewhere turns out to be a retry of
    ours (its worker died before recording the answer): credit it."""
    if case.status is not CaseStatus.RECOVERED or case.recovery_path is not (
        RecoveryPath.PAID_ELSEWHERE
    ):
        return False
    case.recovery_path, case.recovered_by_step = path, step_label
    session.add(AuditEntry.of(case, "engine", "recovery_credited", path=path.value))
    return True


# -- operators -------------------------------------------------------------------------


def _require_open(case: RecoveryCase, action: str) -> None:
    if case.status is not CaseStatus.OPEN:
        raise CaseRefused(f"case {case.id} is {case.status.value}; cannot {action}")


def pause(session: Session, case: RecoveryCase, now: datetime, actor: str, reason: str) -> None:
    _require_open(case, "pause")
    if case.paused_at is not None:
        raise CaseRefused(f"case {case.id} is already paused")
    case.paused_at = now
    steps.cancel(session, case)
    session.add(AuditEntry.of(case, actor, "pause", reason=reason))
    announce.case_event(session, case, announce.PAUSED, now)


def resume(
    session: Session,
    case: RecoveryCase,
    now: datetime,
    actor: str,
    reason: str,
    settings: Settings,
) -> None:
    """Plan a paused case again from now."""
    _require_open(case, "resume")
    if case.paused_at is None:
        raise CaseRefused(f"case {case.id} is not paused")
    case.paused_at = None
    announce.case_event(session, case, announce.RESUMED, now)
    replan(session, case, now, settings)
    session.add(AuditEntry.of(case, actor, "resume", reason=reason))


def cancel(session: Session, case: RecoveryCase, now: datetime, actor: str, reason: str) -> None:
    """Stop recovering the case for good (Stripe is not told)."""
    _require_open(case, "cancel")
    close(session, case, CaseStatus.CANCELED, now, actor=actor)
    session.add(AuditEntry.of(case, actor, "cancel", reason=reason))


def revoke_links(
    session: Session, case: RecoveryCase, now: datetime, actor: str, reason: str
) -> int:
    count = links.revoke_case_links(session, case.id, now, LinkRevoked.OPERATOR)
    session.add(AuditEntry.of(case, actor, "links_revoked", count=count, reason=reason))
    return count


def refused(session: Session, case: RecoveryCase, actor: str, action: str, why: str) -> None:
    """An operator's action the case's state did not allow, kept in its timeline
    (a cancel that came while a retry was charging the card shows there)."""
    session.add(AuditEntry.of(case, actor, f"{action}_refused", why=why))


@dataclass(frozen=True)
class RetryRequest:
    """An operator's retry: the rules it goes past, and the step made for it
    (None on a dry run), or the retry already in flight it joined."""

    refusals: tuple[str, ...]
    step: str | None
    joined: bool = False


def request_retry(
    session: Session,
    case: RecoveryCase,
    now: datetime,
    actor: str,
    reason: str | None,
    force: bool,
    settings: Settings,
    dry_run: bool = False,
) -> RetryRequest:
    """Schedule a retry due now, through the same path as the plan's retries.
    Refused where the rules forbid it (the card must not be retried, the
    networks' limits) unless forced with a reason."""
    _require_open(case, "retry")
    if case.paused_at is not None:
        raise CaseRefused(f"case {case.id} is paused; resume it first")
    # At most one retry of a case in flight: a request made while one is due
    # or running (twenty operators, or one pressing twice) joins it.
    in_flight = steps.retry_in_flight(session, case, now)
    if in_flight is not None:
        return RetryRequest((), in_flight, joined=True)
    reading = classify(planner.failure_of(case))
    refusals = []
    if not reading.may_retry_card:
        refusals.append(f"category {reading.category.value}: {reading.why}")
    gap = timedelta(seconds=settings.card_update_min_gap_seconds)
    if case.last_failure_at is not None and now < case.last_failure_at + gap:
        refusals.append(f"the card declined at {case.last_failure_at:%H:%M:%S}Z, moments ago")
    allowed = planner.earliest_retry(session, case, now, settings)
    if allowed is None:
        refusals.append("a stop code was seen on this card")
    elif allowed > now:
        refusals.append(f"card-network limit: next allowed {allowed:%Y-%m-%d %H:%M}Z")
    if refusals and not force:
        raise CaseRefused("refused: " + "; ".join(refusals) + " (use --force --reason to override)")
    if dry_run:
        return RetryRequest(tuple(refusals), None)
    steps.cancel(session, case, StepKind.RETRY)
    # A worker whose clock is ahead may have claimed a retry that looked not
    # yet due here. Its claim either came before the cancel, and is seen now,
    # or it finds the step canceled: either way the card is charged once.
    claimed = steps.retry_in_flight(session, case, now)
    if claimed is not None:
        return RetryRequest((), claimed, joined=True)
    forced = bool(refusals)
    name = steps.operator_retry_name(now, forced)
    steps.schedule(
        session,
        case,
        StepKind.RETRY,
        name,
        now,
        origin=StepOrigin.OPERATOR,
        forced=forced,
    )
    session.add(AuditEntry.of(case, actor, "retry", reason=reason, forced=forced, step=name))
    return RetryRequest(tuple(refusals), name)
