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
from datetime import datetime
from email import policy
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from recovery.customers.mailer import FileOutbox
from recovery.db import session_scope
from recovery.models import (
    AuditEntry,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepOutcome,
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
    """Remembers what it has told; `news` returns the lines since."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.last_event = 0
        self.last_audit = 0
        self.mailed: set[int] = set()
        self.answered: set[int] = set()

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
            code = f" ({step.decline_code})" if step.decline_code else ""
            lines.append(
                (
                    step.executed_at or step.created_at,
                    f"case {step.case_id}: retry {step.step}: {step.outcome}{code}",
                )
            )
        # One event can be told twice (a new card: attached, then the default).
        news: list[tuple[datetime, str]] = []
        for line in sorted(lines, key=lambda line: line[0]):
            if not news or news[-1][1] != line[1]:
                news.append(line)
        return news


def _audit_line(entry: AuditEntry, case: RecoveryCase) -> str | None:
    detail = entry.detail or {}
    amount = format_money(case.amount_due, case.currency, "en_US")
    match entry.action:
        case "case_opened":
            return f"opened for invoice {case.invoice_id}, {amount} due"
        case "classified":
            return f"{detail.get('category')}: {detail.get('why')}"
        case "card_updated":
            return "the customer saved a new card"
        case "case_recovered":
            recovered = format_money(case.amount_recovered or 0, case.currency, "en_US")
            return f"recovered {recovered}"
        case "final_action":
            return f"window over: {detail.get('final_action')}"
    return None


def tell_while(
    running: Callable[[], bool], outbox: Path, say: Callable[[str], None]
) -> threading.Thread:
    """Tell the story every second until `running` says stop, in a thread."""
    story = Story(outbox)

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
