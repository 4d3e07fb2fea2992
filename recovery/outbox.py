"""The email outbox: every email is a row, sent at most once.

    enqueue ─▶ pending ─claim─▶ claimed ─(checks, link, render)─▶ sending ─SMTP─▶ sent
                  ▲                 │ lease ran out: nothing left us,   │ lease ran out: the
                  │                 ▼ pending again                     ▼ server may have it,
                  └── transient error, with backoff          failed (never resent)

A row is unique per key (a case's plan step, a card's expiry), so concurrent
dispatch, a redelivered task or a second beat cannot create a second email.
Just before handing it to SMTP the row is marked `sending` and committed: a
worker that dies after that point leaves an email that may have gone out, and
it is recorded for an operator instead of being sent again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import func, select, update

from recovery import emails, engine, links, mailer
from recovery.config import Settings
from recovery.db import insert_ignore, session_scope
from recovery.models import (
    AuditEntry,
    CaseStatus,
    Customer,
    Message,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepStatus,
)

log = structlog.get_logger("recovery.outbox")

MAX_ATTEMPTS = 8
LEASE = timedelta(minutes=5)
_LOST = "worker lost while sending; not sent again so it cannot arrive twice"


def case_key(case_id: int, step: str) -> str:
    return f"case:{case_id}:{step}"


def enqueue(
    session,
    key: str,
    template: str,
    step: str,
    now: datetime,
    case_id: int | None = None,
    customer_id: int | None = None,
) -> bool:
    """Queue an email unless one with this key exists; True if queued now."""
    return insert_ignore(
        session,
        Message.__table__,
        {
            "key": key,
            "case_id": case_id,
            "customer_id": customer_id,
            "step": step,
            "template": template,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        },
        ["key"],
    )


def on_case_recovered(session, case: RecoveryCase, now: datetime) -> None:
    """Thank a customer we reminded; one who never heard from us gets nothing."""
    reminded = session.scalar(
        select(func.count())
        .select_from(Message)
        .where(Message.case_id == case.id, Message.status == "sent")
    )
    if reminded:
        enqueue(session, case_key(case.id, "recovered"), "recovered", "recovered", now, case.id)


# -- claiming --------------------------------------------------------------------


def release_lapsed(now: datetime) -> int:
    """Leases that ran out: back to pending before SMTP, failed after."""
    with session_scope() as session:
        back = session.execute(
            update(Message)
            .where(Message.status == "claimed", Message.lease_until <= now)
            .values(status="pending", lease_until=None)
        ).rowcount
        lost = session.execute(
            update(Message)
            .where(Message.status == "sending", Message.lease_until <= now)
            .values(status="failed", lease_until=None, last_error=_LOST)
        ).rowcount
    if lost:
        log.error("emails_lost_mid_send", count=lost)
    return back + lost


def claim(now: datetime, limit: int, keys: list[str] | None = None) -> list[int]:
    with session_scope() as session:
        due = (
            select(Message.id)
            .where(Message.status == "pending", Message.next_attempt_at <= now)
            .order_by(Message.next_attempt_at)
            .limit(limit)
        )
        if keys is not None:
            due = due.where(Message.key.in_(keys))
        if session.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        return list(
            session.scalars(
                update(Message)
                .where(Message.id.in_(due.scalar_subquery()), Message.status == "pending")
                .values(status="claimed", lease_until=now + LEASE, attempts=Message.attempts + 1)
                .returning(Message.id)
            )
        )


def dispatch(now: datetime, hand_off: Callable[[list[int]], None], batch: int = 200) -> int:
    """Claim every due email and hand each batch to `hand_off` (workers, or here)."""
    total = 0
    while ids := claim(now, batch):
        hand_off(ids)
        total += len(ids)
        if len(ids) < batch:
            break
    return total


# -- sending ---------------------------------------------------------------------


def _skip_reason(message: Message, case: RecoveryCase | None, customer: Customer | None):
    if customer is None or not customer.email:
        return "no email address"
    if message.template in emails.REMINDERS and customer.reminders_opted_out_at is not None:
        return "customer opted out of reminders"
    if case is None:
        return None
    if message.template == "recovered":
        return None if case.status == CaseStatus.RECOVERED.value else "case not recovered"
    if case.status != CaseStatus.OPEN.value:
        return f"case {case.status}"
    if case.paused_at is not None:
        return "case paused"
    return None


def _plan_dates(session, case: RecoveryCase, settings: Settings):
    def next_due(kind: StepKind):
        return session.scalar(
            select(func.min(RecoveryAttempt.due_at)).where(
                RecoveryAttempt.case_id == case.id,
                RecoveryAttempt.kind == kind.value,
                RecoveryAttempt.status == StepStatus.SCHEDULED.value,
            )
        )

    next_retry = next_due(StepKind.RETRY) or case.next_payment_attempt
    final_at = next_due(StepKind.FINAL)
    action = None
    if final_at is not None and case.category:
        action = engine.plan_for(engine.Category(case.category), settings).final_action.value
    return next_retry, final_at, action


def facts_for(session, message: Message, case, customer, settings, now) -> emails.Facts:
    public = settings.public_base_url
    ttl = timedelta(days=settings.link_ttl_days)
    action_url = opt_out_url = None
    purpose = emails.link_purpose(message.template, case.category if case else None)
    if purpose:
        token = links.mint(
            session,
            links.Purpose(purpose),
            now,
            ttl,
            case_id=case.id if case else None,
            customer_id=customer.id,
        )
        action_url = f"{public}/r/{token}"
    if message.template in emails.REMINDERS:
        token = links.mint(session, links.Purpose.OPT_OUT, now, ttl, customer_id=customer.id)
        opt_out_url = f"{public}/u/{token}"
    if case is None:  # pre-dunning: what the card-expiry event told us
        extra = message_facts(session, message)
        return emails.Facts(
            amount=0,
            currency="usd",
            locale=customer.locale,
            timezone=customer.timezone,
            customer_name=customer.name,
            action_url=action_url,
            opt_out_url=opt_out_url,
            **extra,
        )
    next_retry, final_at, final_action = _plan_dates(session, case, settings)
    return emails.Facts(
        amount=case.amount_due,
        currency=case.currency,
        locale=customer.locale,
        timezone=customer.timezone,
        customer_name=customer.name,
        category=case.category,
        decline_code=case.decline_code,
        card_brand=case.card_brand,
        card_last4=case.card_last4,
        card_exp_month=case.card_exp_month,
        card_exp_year=case.card_exp_year,
        next_retry_at=next_retry if next_retry and next_retry > now else None,
        final_at=final_at,
        final_action=final_action,
        action_url=action_url,
        opt_out_url=opt_out_url,
    )


def message_facts(session, message: Message) -> dict:
    """The card a pre-dunning email is about, from the step name
    `card_expiring:<brand>:<last4>:<year>-<month>`."""
    _, brand, last4, expiry = message.step.split(":", 3)
    year, month = (int(part) for part in expiry.split("-"))
    return {
        "card_brand": brand,
        "card_last4": last4,
        "card_exp_year": year,
        "card_exp_month": month,
    }


def send(message_id: int, now: datetime, settings: Settings, transport) -> str | None:
    """Send one claimed email; returns the outcome, or None if not ours to send."""
    with session_scope() as session:
        message = session.get(Message, message_id, with_for_update=True)
        if message is None or message.status != "claimed":
            return None
        case = session.get(RecoveryCase, message.case_id) if message.case_id else None
        customer_id = message.customer_id or (case.customer_id if case else None)
        customer = session.get(Customer, customer_id) if customer_id else None
        reason = _skip_reason(message, case, customer)
        if reason:
            message.status, message.last_error, message.lease_until = "skipped", reason, None
            log.info("email_skipped", message_id=message.id, template=message.template, why=reason)
            return "skipped"
        facts = facts_for(session, message, case, customer, settings, now)
        rendered = emails.render(message.template, facts, settings)
        email = mailer.build(rendered, customer.email, settings, opt_out_url=facts.opt_out_url)
        message.status, message.smtp_message_id = "sending", email["Message-ID"]
        template, case_id, attempts = message.template, message.case_id, message.attempts
    try:
        transport.send(email)
    except mailer.SendFailed as failed:
        return _failed(message_id, now, failed, attempts)
    with session_scope() as session:
        session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(status="sent", sent_at=now, lease_until=None, last_error=None)
        )
        if case_id is not None:
            session.add(
                AuditEntry(
                    case_id=case_id,
                    actor="engine",
                    action="email_sent",
                    detail={"template": template},
                )
            )
    log.info("email_sent", message_id=message_id, template=template)
    return "sent"


def _failed(message_id: int, now: datetime, failed: mailer.SendFailed, attempts: int) -> str:
    permanent = failed.permanent or attempts >= MAX_ATTEMPTS
    values = {"last_error": str(failed), "lease_until": None}
    if permanent:
        values["status"] = "failed"
    else:
        delay = timedelta(seconds=min(60 * 2 ** (attempts - 1), 6 * 3600))
        values.update(status="pending", next_attempt_at=now + delay)
    with session_scope() as session:
        session.execute(update(Message).where(Message.id == message_id).values(**values))
    log.warning("email_failed", message_id=message_id, permanent=permanent, error=str(failed)[:120])
    return "failed" if permanent else "retrying"


def send_all(ids: list[int], now: datetime, settings: Settings, transport=None) -> dict[int, str]:
    transport = transport or mailer.transport_for(settings)
    return {message_id: send(message_id, now, settings, transport) for message_id in ids}


def send_now(key: str, now: datetime, settings: Settings) -> str | None:
    """Send one just-queued email at once rather than at the next sweep."""
    ids = claim(now, 1, keys=[key])
    return send_all(ids, now, settings).get(ids[0]) if ids else None
