"""Sending what the outbox holds: check, link, render, deliver, at most once.

A batch of claimed emails is prepared in one transaction (the re-checks, the
links minted, both parts rendered). Then each goes to SMTP in turn, and one
statement per email both marks the previous one `sent` and this one `sending`:
at any moment at most one row of the batch is in doubt, and a worker that
dies leaves exactly that one to an operator, the rest sent or still to send.
Whether a case's email may still go out is engine/cases.py's answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, func, select, update
from sqlalchemy import case as when
from sqlalchemy.orm import Session

from recovery import clock
from recovery.business import alerts
from recovery.config import Settings, plausible_address
from recovery.customers import emails, links, mailer, outbox
from recovery.db import get_engine, session_scope
from recovery.engine import cases, planner
from recovery.models import (
    CaseStatus,
    Customer,
    LinkPurpose,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepStatus,
)

log = structlog.get_logger("recovery.delivery")

MAX_ATTEMPTS = 8
# 1 min, 2 min, 4 min, … at most six hours between tries of an email.
EMAIL_RETRY_CAP = timedelta(hours=6)


@dataclass(frozen=True)
class Ready:
    message_id: int
    template: str
    attempts: int
    email: mailer.Outgoing
    in_doubt: bool  # a resend of one that may have arrived
    # The customer's name and address, kept out of what is stored and logged.
    personal: tuple[str, ...]


def skip_reason(
    message: Message, case: RecoveryCase | None, customer: Customer | None
) -> str | None:
    """Why this email must not go out now, or None."""
    if customer is None or not customer.email:
        return "no email address"
    if not plausible_address(customer.email):
        return "invalid email address"
    if message.template in emails.REMINDERS and customer.reminders_opted_out_at is not None:
        return "customer opted out of reminders"
    if case is None:
        return None
    if message.template == "recovered":
        return None if case.status is CaseStatus.RECOVERED else "case not recovered"
    if not cases.may_act(case):
        return "case paused" if case.status is CaseStatus.OPEN else f"case {case.status.value}"
    return None


PlanDates = tuple[datetime | None, datetime | None, str | None]


def plan_dates(
    session: Session, open_cases: list[RecoveryCase], settings: Settings
) -> dict[int, PlanDates]:
    """Per case: the next retry, the final action's date and what it does."""

    def first(kind: StepKind) -> Any:
        return func.min(RecoveryAttempt.due_at).filter(RecoveryAttempt.kind == kind)

    found = {
        case_id: (retry, final)
        for case_id, retry, final in session.execute(
            select(RecoveryAttempt.case_id, first(StepKind.RETRY), first(StepKind.FINAL))
            .where(
                RecoveryAttempt.case_id.in_([c.id for c in open_cases]),
                RecoveryAttempt.status == StepStatus.SCHEDULED,
            )
            .group_by(RecoveryAttempt.case_id)
        )
    }
    dates: dict[int, PlanDates] = {}
    for case in open_cases:
        retry, final = found.get(case.id, (None, None))
        action = None
        if final is not None and case.category:
            action = planner.plan_for(case.category, settings).final_action.value
        dates[case.id] = (retry or case.next_payment_attempt, final, action)
    return dates


def links_wanted(
    message: Message, case: RecoveryCase | None, customer: Customer
) -> list[links.Wanted]:
    wanted = []
    purpose = emails.link_purpose(message.template, case.category if case else None)
    if purpose:
        wanted.append(links.Wanted(purpose, case.id if case else None, customer.id))
    if message.template in emails.REMINDERS:
        wanted.append(links.Wanted(LinkPurpose.OPT_OUT, None, customer.id))
    return wanted


def facts(
    message: Message,
    case: RecoveryCase | None,
    customer: Customer,
    dates: PlanDates | None,
    urls: dict[LinkPurpose, str],
    now: datetime,
) -> emails.Facts:
    """What the email says, in the customer's terms; `urls` by link purpose."""
    action_url = next((u for p, u in urls.items() if p is not LinkPurpose.OPT_OUT), None)
    common: dict[str, Any] = {
        "locale": customer.locale,
        "timezone": customer.timezone,
        "customer_name": customer.name,
        "action_url": action_url,
        "opt_out_url": urls.get(LinkPurpose.OPT_OUT),
    }
    if case is None:  # pre-dunning: the card the expiry notice named
        return emails.Facts(
            amount=0,
            currency="usd",
            card_brand=message.card_brand,
            card_last4=message.card_last4,
            card_exp_month=message.card_exp_month,
            card_exp_year=message.card_exp_year,
            **common,
        )
    next_retry, final_at, final_action = dates or (None, None, None)
    return emails.Facts(
        amount=case.amount_due,
        currency=case.currency,
        category=case.category,
        decline_code=case.decline_code,
        card_brand=case.card_brand,
        card_last4=case.card_last4,
        card_exp_month=case.card_exp_month,
        card_exp_year=case.card_exp_year,
        next_retry_at=next_retry if next_retry and next_retry > now else None,
        final_at=final_at,
        final_action=final_action,
        **common,
    )


def prepare(
    ids: list[int], now: datetime, settings: Settings
) -> tuple[list[Ready], dict[int, str | None]]:
    """Re-check, mint links and render a batch of claimed emails, in one
    transaction. Returns the emails ready to send and the outcomes of the rest
    (None: no longer ours)."""
    outcomes: dict[int, str | None] = dict.fromkeys(ids)
    with session_scope() as session:
        rows = session.execute(
            select(Message, RecoveryCase, Customer)
            .outerjoin(RecoveryCase, RecoveryCase.id == Message.case_id)
            .outerjoin(
                Customer,
                Customer.id == func.coalesce(Message.customer_id, RecoveryCase.customer_id),
            )
            .where(Message.id.in_(ids), Message.status == MessageStatus.CLAIMED)
            .order_by(Message.id)
            .with_for_update(of=Message)
        ).all()
        live: list[tuple[Message, RecoveryCase | None, Customer, str]] = []
        for message, case, customer in rows:
            reason = skip_reason(message, case, customer)
            if reason is None and customer is not None and customer.email:
                live.append((message, case, customer, customer.email))
                continue
            reason = reason or "no email address"
            outcomes[message.id] = _settle(session, message.id, MessageStatus.SKIPPED, reason)
            log.info("email_skipped", message_id=message.id, template=message.template, why=reason)
        dates = plan_dates(session, [c for _, c, _, _ in live if c is not None], settings)
        wanted = [links_wanted(m, c, cu) for m, c, cu, _ in live]
        tokens = iter(
            links.mint_many(
                session,
                [w for each in wanted for w in each],
                now,
                timedelta(days=settings.link_ttl_days),
            )
        )
        ready = []
        for (message, owner, customer, address), its_links in zip(live, wanted, strict=True):
            urls = {w.purpose: links.url(settings, w.purpose, next(tokens)) for w in its_links}
            its_dates = dates.get(owner.id) if owner else None
            personal = tuple(p for p in (customer.name, address) if p)
            try:
                said = facts(message, owner, customer, its_dates, urls, now)
                rendered = emails.render(message.template, said, settings)
                email = mailer.build(
                    rendered,
                    address,
                    settings,
                    opt_out_url=said.opt_out_url,
                    message_id=message.smtp_message_id if message.in_doubt else None,
                )
            except Exception as exc:  # noqa: BLE001 - one email's fault stays with it
                # Its own fault (data no template or encoding can take): it
                # fails alone, with a reason, and the batch goes on.
                reason = scrub(f"cannot be prepared: {type(exc).__name__}: {exc}", personal)
                outcomes[message.id] = _settle(session, message.id, MessageStatus.FAILED, reason)
                log.error("email_unpreparable", message_id=message.id, error=type(exc).__name__)
                continue
            ready.append(
                Ready(
                    message.id,
                    message.template,
                    message.attempts,
                    email,
                    message.in_doubt,
                    personal,
                )
            )
    return ready, outcomes


def scrub(text: str, personal: tuple[str, ...]) -> str:
    """`text` without the customer's name or address (servers quote them)."""
    for value in sorted(personal, key=len, reverse=True):
        text = text.replace(value, "<customer>")
    return text


def send_all(
    ids: list[int], now: datetime, settings: Settings, transport: mailer.Transport | None = None
) -> dict[int, str | None]:
    """Send a batch of claimed emails; outcome per id (None: not ours to send)."""
    transport = transport or mailer.transport_for(settings)
    ready, outcomes = prepare(ids, now, settings)
    previous: int | None = None
    for item in ready:
        if not _advance(previous, item, now):
            outcomes[item.message_id], previous = None, None
            continue
        try:
            transport.send(item.email)
        except mailer.SendFailed as failed:
            outcomes[item.message_id], previous = _failed(item, now, failed), None
            continue
        outcomes[item.message_id], previous = MessageStatus.SENT, item.message_id
        log.info("email_sent", message_id=item.message_id, template=item.template)
    _advance(previous, None, now)
    if ready:
        sent = MessageStatus.SENT in outcomes.values()
        if sent or "retrying" in outcomes.values():
            # Operators hear of a mail server refusing for 10 minutes.
            alerts.smtp_answered(refused=not sent, now=now)
    return outcomes


_DONE = Message.id == bindparam("done_id")
# Built once, executed with four values: one statement per email sent.
_ADVANCE = (
    update(Message)
    .where(
        Message.id.in_([bindparam("done_id"), bindparam("next_id")]),
        when(
            (_DONE, Message.status == MessageStatus.SENDING),
            else_=Message.status == MessageStatus.CLAIMED,
        ),
    )
    .values(
        status=when((_DONE, MessageStatus.SENT.value), else_=MessageStatus.SENDING.value),
        sent_at=when((_DONE, bindparam("sent_moment")), else_=Message.sent_at),
        lease_until=when((_DONE, None), else_=Message.lease_until),
        last_error=when((_DONE, None), else_=Message.last_error),
        smtp_message_id=when((_DONE, Message.smtp_message_id), else_=bindparam("next_message_id")),
    )
    .returning(Message.id)
)


def _advance(sent: int | None, sending: Ready | None, now: datetime) -> bool:
    """Mark the email just delivered `sent` and the next one `sending`, in one
    committed statement; False if the next one is no longer ours."""
    if sent is None and sending is None:
        return True
    with get_engine().begin() as conn:
        changed = set(
            conn.execute(
                _ADVANCE,
                {
                    "done_id": sent,
                    "next_id": sending.message_id if sending else None,
                    "sent_moment": now,
                    "next_message_id": sending.email.message_id if sending else None,
                },
            ).scalars()
        )
    return sending is None or sending.message_id in changed


def _settle(session: Session, message_id: int, status: MessageStatus, reason: str) -> str:
    """A claimed email that will not be sent: its status and why."""
    _mark(session, message_id, status=status, last_error=reason, lease_until=None)
    return status


def _mark(session: Session, message_id: int, **values: Any) -> None:
    session.execute(update(Message).where(Message.id == message_id).values(**values))


def _failed(item: Ready, now: datetime, failed: mailer.SendFailed) -> str:
    # In doubt twice: it may have arrived twice already; never a third time.
    permanent = (
        failed.permanent or item.attempts >= MAX_ATTEMPTS or (failed.in_doubt and item.in_doubt)
    )
    error = scrub(str(failed), item.personal)
    values: dict[str, Any] = {"last_error": error, "lease_until": None}
    if permanent:
        values["status"] = MessageStatus.FAILED
    else:
        delay = clock.doubling(item.attempts, EMAIL_RETRY_CAP, first=timedelta(minutes=1))
        values.update(status=MessageStatus.PENDING, next_attempt_at=now + delay)
        if failed.in_doubt:
            values["in_doubt"] = True  # the resend keeps its Message-ID
    with session_scope() as session:
        _mark(session, item.message_id, **values)
    log.warning("email_failed", message_id=item.message_id, permanent=permanent, error=error[:120])
    return MessageStatus.FAILED if permanent else "retrying"


def send_now(key: str, now: datetime, settings: Settings) -> str | None:
    """Send one just-queued email at once rather than at the next sweep."""
    ids = outbox.claim(now, 1, keys=[key])
    return send_all(ids, now, settings).get(ids[0]) if ids else None
