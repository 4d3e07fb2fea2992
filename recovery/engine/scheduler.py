"""One pass as of an instant: stored events to their handlers, the steps due
executed by kind, then the outbox.

`recovery tick --now T --sync` runs a pass in-process with the clock at T, so
an outside driver (tests, the demo, backtests) moves a plan through simulated
weeks with the same code that runs in production; Celery's tasks run the
same functions one batch at a time.

A step is executed by its kind: a retry or the final action by retries.py, an
email by queueing it in the outbox and sending it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from recovery import clock, stripe_api
from recovery.business import deliveries
from recovery.config import Settings
from recovery.customers import delivery, outbox, texting
from recovery.db import session_scope
from recovery.engine import cases, events, planner, retries, steps
from recovery.inbox import relay
from recovery.models import Customer, RecoveryCase, StepKind, StepOutcome

log = structlog.get_logger("recovery.scheduler")

# An email whose case has a retry due or running waits this long for its answer.
EMAIL_WAITS_FOR_RETRY = timedelta(minutes=15)


def execute_email(step: steps.Step, now: datetime, settings: Settings) -> str:
    """Queue the step's email in the outbox and send it, once Stripe has said
    the invoice is still open and its subscription alive: webhooks lag, and a
    customer who just paid or left is not told the payment failed."""
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        outcome = _email_must_wait(session, case, step, now)
        if outcome is not None:
            return outcome
        invoice_id = case.invoice_id
    try:
        invoice = stripe_api.retrieve_invoice_state(invoice_id)
    except stripe_api.StripeUnavailable as exc:
        with session_scope() as session:
            return steps.back_off(session, step, clock.now(), type(exc).__name__)
    with session_scope() as session:
        case = cases.locked(session, step.case_id)
        settled = retries.settle_from_stripe(session, case, invoice, now)
        if settled is not None:
            steps.finish(session, step, now, settled)
            return settled
        outcome = _email_must_wait(session, case, step, now)
        if outcome is not None:
            return outcome
        key = outbox.case_key(case.id, step.name)
        template = step.template or "payment_failed"
        outbox.enqueue(session, key, template, step.name, now, case_id=case.id)
        if case.category and template in planner.plan_for(case.category, settings).sms:
            customer = session.get(Customer, case.customer_id) if case.customer_id else None
            tz = customer.timezone if customer else None
            texting.enqueue(session, case, step.name, template, now, tz, settings)
        steps.finish(session, step, now, StepOutcome.QUEUED)
    # Sent here and now; a failure is retried by the outbox, not by the step.
    return delivery.send_now(key, now, settings) or StepOutcome.QUEUED


def _email_must_wait(
    session: Session, case: RecoveryCase, step: steps.Step, now: datetime
) -> str | None:
    """Why the email is not sent now (its outcome), or None."""
    idle = cases.idle_outcome(case)
    if idle is not None:
        steps.finish(session, step, now, idle)
        return idle
    if steps.retry_due_or_running(session, case.id, now):
        # A retry is due or under way (a new card's, or the plan's): its
        # result decides what to say, or whether to write at all.
        steps.reschedule(session, step, now + EMAIL_WAITS_FOR_RETRY, None, step.tries)
        return StepOutcome.DEFERRED_FOR_RETRY
    return None


EXECUTORS: dict[StepKind, Callable[[steps.Step, datetime, Settings], str]] = {
    StepKind.RETRY: retries.execute_retry,
    StepKind.EMAIL: execute_email,
    StepKind.FINAL: retries.execute_final,
}


def execute(claim: steps.Claim, now: datetime, settings: Settings) -> str | None:
    """Run one claimed step; returns its outcome, or None if the claim is stale.
    The step runs as of the later of `now` and the clock: a batch takes time,
    and each step's lease and backoff count from when the step itself runs."""
    now = max(now, clock.now())
    step = steps.start(claim, now, timedelta(seconds=settings.step_lease_seconds))
    if step is None:
        return None
    structlog.contextvars.bind_contextvars(step_id=step.id, case_id=step.case_id)
    try:
        return EXECUTORS[step.kind](step, now, settings)
    finally:
        structlog.contextvars.unbind_contextvars("step_id", "case_id")


def execute_all(
    claims: Sequence[steps.Claim], now: datetime, settings: Settings
) -> dict[steps.Claim, str | None]:
    return {claim: execute(claim, now, settings) for claim in claims}


def execute_named(case_id: int, name: str, now: datetime, settings: Settings) -> str | None:
    """Claim and run one named step now (an operator's retry); None if a worker
    took it first."""
    claim = steps.claim_named(case_id, name, now, timedelta(seconds=settings.step_lease_seconds))
    return execute(claim, now, settings) if claim else None


def process_events(
    event_ids: Sequence[int], now: datetime, settings: Settings
) -> dict[int, str | None]:
    """Stored events through their handlers (engine/events.py)."""
    return relay.process_events(event_ids, now, settings, events.handle_event)


@dataclass
class PassResult:
    events: int = 0
    steps: int = 0
    emails: int = 0
    webhooks: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


Publish = Callable[[list[int]], None]


def anything_due(now: datetime) -> bool:
    """Whether a pass at `now` would find an event, step or email to take:
    the same conditions the pass claims by, asked without claiming."""
    found = or_(*(exists().where(due(now)) for due in (relay.due, steps.due, outbox.due)))
    with session_scope() as session:
        return session.scalar(select(found)) is True


def run_pass(
    settings: Settings,
    sync: bool,
    publish_events: Publish | None = None,
    publish_steps: Callable[[list[steps.Claim]], None] | None = None,
    publish_messages: Publish | None = None,
    publish_deliveries: Callable[[deliveries.Batch], None] | None = None,
) -> PassResult:
    """Process due events, steps and emails as of clock.now(): in this process
    when `sync`, else handed to the publishers (Celery)."""
    now = clock.now()
    result = PassResult()
    batch: list[int] = []
    publish = batch.extend if sync or publish_events is None else publish_events
    result.events = relay.relay(publish, now, settings.relay_batch_size)
    if batch:
        process_events(batch, now, settings)

    def run_here(claims: list[steps.Claim]) -> None:
        for outcome in execute_all(claims, now, settings).values():
            result.count(outcome or "stale_claim")

    result.steps = steps.dispatch(
        now, settings, run_here if sync or publish_steps is None else publish_steps
    )

    def send_here(ids: list[int]) -> None:
        for outcome in delivery.send_all(ids, now, settings).values():
            result.count(f"email_{outcome or 'stale'}")

    outbox.release_lapsed(now)
    result.emails = outbox.dispatch(
        now, send_here if sync or publish_messages is None else publish_messages
    )

    def deliver_here(batch: deliveries.Batch) -> None:
        for outcome in deliveries.send(batch, settings).values():
            result.count(f"webhook_{outcome}")

    result.webhooks = deliveries.dispatch(
        now, deliver_here if sync or publish_deliveries is None else publish_deliveries
    )
    if sync or publish_deliveries is None:
        for outcome in texting.send_due(now, settings).values():
            result.count(f"sms_{outcome.split(':')[0]}")
    return result
