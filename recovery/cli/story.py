"""What `recovery dev` prints while it runs: each thing the stack does, in
words, as it happens (an event arrives, a case opens, an email goes out with
the link to click, a retry and its answer, the recovery), read from the
database the stack writes. For this machine's terminal only: an email's link
is printed so the person trying it can click it, which no log line would do.
"""

from __future__ import annotations

import email
import re
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from email import policy
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from recovery import clock
from recovery.customers.mailer import FileOutbox
from recovery.db import session_scope
from recovery.engine.classify import described
from recovery.models import (
    AuditEntry,
    CaseStatus,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepOrigin,
    StepOutcome,
    StepStatus,
    WebhookEvent,
)
from recovery.money import format_money

_LINK = re.compile(r"https?://\S+/r/[A-Za-z0-9_-]+")


def email_link(outbox: Path, smtp_message_id: str | None) -> str | None:
    """The recovery link in the .eml the file sink wrote for this message."""
    if not smtp_message_id:
        return None
    for path in FileOutbox(outbox).written(smtp_message_id):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        for part in message.walk():
            if part.get_content_type() == "text/plain":
                found = _LINK.search(part.get_content())
                if found:
                    return found.group(0)
    return None


class Story:
    """Remembers what it has told; `news` returns the lines since. What the
    database held before the story began (an earlier run's) is not news."""

    def __init__(self, outbox: Path, session: Session | None = None) -> None:
        self.outbox = outbox
        self.last_event = 0
        self.last_audit = 0
        self.mailed: set[int] = set()
        self.answered: set[int] = set()
        # The retry each case waits for, as last told: (step id, due).
        self.next_retry: dict[int, tuple[int, datetime]] = {}
        # Cases told of a new card and not yet of the retry it brought: one
        # card saved through Stripe is several events, told once.
        self.card_told: set[int] = set()
        if session is not None:
            self.news(session)

    def news(self, session: Session) -> list[tuple[datetime, str]]:
        lines: list[tuple[datetime, str]] = []
        for event in session.scalars(
            select(WebhookEvent).where(WebhookEvent.id > self.last_event).order_by(WebhookEvent.id)
        ):
            self.last_event = event.id
            lines.append(
                (event.received_at, f"event received: {event.type} ({event.stripe_event_id})")
            )
        for entry, case in session.execute(
            select(AuditEntry, RecoveryCase)
            .join(RecoveryCase, RecoveryCase.id == AuditEntry.case_id)
            .where(AuditEntry.id > self.last_audit)
            .order_by(AuditEntry.id)
        ):
            self.last_audit = entry.id
            if entry.action == "card_updated":
                if case.id in self.card_told:
                    continue
                self.card_told.add(case.id)
                lines.append((entry.created_at, f"case {case.id}: {_new_card(session, entry)}"))
                continue
            told = _audit_line(entry, case)
            if told:
                lines.append((entry.created_at, f"case {case.id}: {told}"))
        for message in session.scalars(
            select(Message).where(Message.status == MessageStatus.SENT).order_by(Message.id)
        ):
            if message.id in self.mailed:
                continue
            self.mailed.add(message.id)
            link = email_link(self.outbox, message.smtp_message_id)
            where = f"; its link: {link}" if link else ""
            lines.append(
                (
                    message.sent_at or message.created_at,
                    f"case {message.case_id}: email {message.template} sent{where}",
                )
            )
        for step in session.scalars(
            select(RecoveryAttempt)
            .where(
                RecoveryAttempt.kind == StepKind.RETRY,
                RecoveryAttempt.outcome.is_not(None),
                # Steps dropped unrun (the case closed first) are no news.
                RecoveryAttempt.outcome != StepOutcome.CANCELED,
            )
            .order_by(RecoveryAttempt.id)
        ):
            if step.id in self.answered:
                continue
            self.answered.add(step.id)
            self.card_told.discard(step.case_id)
            code = f" ({step.decline_code})" if step.decline_code else ""
            lines.append(
                (
                    step.executed_at or step.created_at,
                    f"case {step.case_id}: retry {step.step}: {step.outcome}{code}",
                )
            )
        lines.extend(self._next_retries(session))
        # One event can be told twice (a new card: attached, then the default).
        news: list[tuple[datetime, str]] = []
        for line in sorted(lines, key=lambda line: line[0]):
            if not news or news[-1][1] != line[1]:
                news.append(line)
        return news

    def _next_retries(self, session: Session) -> list[tuple[datetime, str]]:
        """Each open case's next retry, when it is new or moved."""
        found: dict[int, RecoveryAttempt] = {}
        for step in session.scalars(
            select(RecoveryAttempt)
            .join(RecoveryCase, RecoveryCase.id == RecoveryAttempt.case_id)
            .where(
                RecoveryCase.status == CaseStatus.OPEN,
                RecoveryAttempt.kind == StepKind.RETRY,
                RecoveryAttempt.status == StepStatus.SCHEDULED,
            )
            .order_by(RecoveryAttempt.due_at, RecoveryAttempt.id)
        ):
            found.setdefault(step.case_id, step)
        lines, now = [], clock.now()
        for case_id, step in found.items():
            if self.next_retry.get(case_id) == (step.id, step.due_at):
                continue
            self.next_retry[case_id] = (step.id, step.due_at)
            why = f" ({step.why})" if step.why else ""
            # Told after what brought it, which came before now.
            lines.append((now, f"case {case_id}: next retry {_when(step.due_at, now)}{why}"))
        return lines


def _new_card(session: Session, entry: AuditEntry) -> str:
    """A saved card, and when the retry it brought is due: the step the same
    transaction made, so created within moments of the entry."""
    retry = session.scalars(
        select(RecoveryAttempt)
        .where(
            RecoveryAttempt.case_id == entry.case_id,
            RecoveryAttempt.origin == StepOrigin.CARD_UPDATE,
            RecoveryAttempt.created_at >= entry.created_at - timedelta(seconds=5),
        )
        .order_by(RecoveryAttempt.id.desc())
    ).first()
    if retry is None:
        return "the customer saved a new card"
    when = _when(retry.due_at, entry.created_at)
    spared = "" if when == "due now" else ": the card that declined is spared until then"
    return f"the customer saved a new card; its retry {when}{spared}"


def _when(due: datetime, now: datetime) -> str:
    """A moment as a person waiting for it reads it: at once, or when and how soon."""
    wait = (due - now).total_seconds()
    if wait < 60:
        return "due now"
    if wait < 3 * 3600:
        return f"at {due:%H:%M:%S} UTC, in {round(wait / 60)} min"
    return f"on {due:%Y-%m-%d} at {due:%H:%M} UTC, in {wait / 86_400:.1f} days"


def _audit_line(entry: AuditEntry, case: RecoveryCase) -> str | None:
    detail = entry.detail or {}
    amount = format_money(case.amount_due, case.currency, "en_US")
    match entry.action:
        case "case_opened":
            return f"opened for invoice {case.invoice_id}, {amount} due"
        case "classified":
            return f"{described(detail.get('category'))}: {detail.get('why')}"
        case "case_recovered":
            recovered = format_money(case.amount_recovered or 0, case.currency, "en_US")
            return f"recovered {recovered}"
        case "final_action":
            return f"window over: {detail.get('final_action')}"
    return None


def tell_while(
    running: Callable[[], bool], outbox: Path, say: Callable[[str], None]
) -> threading.Thread:
    """Tell the story every second until `running` says stop, in a thread:
    what happens from now on, not what an earlier run left."""
    with session_scope() as session:
        story = Story(outbox, session)

    def loop() -> None:
        stop = threading.Event()
        while running():
            try:
                with session_scope() as session:
                    for _at, line in story.news(session):
                        say(f"  · {line}")
            except SQLAlchemyError:  # a busy embedded database: tell it next time
                pass
            stop.wait(1.0)

    thread = threading.Thread(target=loop, name="story", daemon=True)
    thread.start()
    return thread
