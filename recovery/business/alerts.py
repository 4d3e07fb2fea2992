"""Alerts to the business's operators, through apprise (ALERT_URLS).

Each condition is a row: whether it holds, since when, and when operators
were last told. A condition that starts to hold is told at once, unless it
was told less than an hour ago (a flapping one alerts once an hour at most);
one still holding is told again every hour; one that stops holding is told
as cleared, if its start was. With no ALERT_URLS the alerts are only logged.

    event_failed        a Stripe event ended `failed` (it waits for a replay)
    stripe_key          Stripe answered 401/403: the key was revoked or rolled
    smtp_refusing       the mail server has refused every email for 10 minutes
    steps_overdue       due retries or emails waiting past ALERT_OVERDUE_MINUTES
    decline_rate        today's retries declined far more than the last week's
    endpoint_disabled:N a webhook endpoint was disabled (410, or 5 days failing)

Alerts name counts, ids and codes, never a customer or a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from recovery import counts
from recovery.config import Settings
from recovery.db import insert_ignore, session_scope
from recovery.models import (
    AlertState,
    CaseStatus,
    Delivery,
    DeliveryStatus,
    EventStatus,
    Message,
    MessageStatus,
    RecoveryAttempt,
    RecoveryCase,
    StepKind,
    StepOutcome,
    StepStatus,
    WebhookEvent,
)

log = structlog.get_logger("recovery.alerts")

REPEAT = timedelta(hours=1)
SMTP_GRACE = timedelta(minutes=10)
# Today's decline rate alerts when it is this much above the trailing week's,
# over at least this many charges (a handful of declines is no signal).
DECLINE_RISE = 0.25
DECLINE_MIN_CHARGES = 20

EVENT_FAILED = "event_failed"
STRIPE_KEY = "stripe_key"
SMTP_REFUSING = "smtp_refusing"
STEPS_OVERDUE = "steps_overdue"
DECLINE_RATE = "decline_rate"
# Not a condition: when the mail server began refusing every email.
SMTP_OBSERVED = "smtp_refused_since"


def endpoint_condition(endpoint_id: int) -> str:
    return f"endpoint_disabled:{endpoint_id}"


Sender = Callable[[str, str], bool]


def apprise_sender(settings: Settings) -> Sender:
    """Sends a title and body to every ALERT_URLS service; True if all took it."""

    def send(title: str, body: str) -> bool:
        if not settings.alert_urls:
            return True
        import apprise  # loaded only by what alerts: it registers 100+ services

        notifier = apprise.Apprise()
        for url in settings.alert_urls:
            notifier.add(url)
        return bool(notifier.notify(title=title, body=body))

    return send


_sender: Callable[[Settings], Sender] = apprise_sender


def notify(title: str, body: str, settings: Settings) -> bool:
    log.warning("alert", title=title)
    sent = _sender(settings)(title, body)
    if not sent:
        log.error("alert_not_delivered", title=title)
    return sent


@dataclass(frozen=True)
class Told:
    name: str
    what: str  # "firing", "reminder", "cleared"
    text: str


def set_condition(
    name: str, holds: bool, detail: str, now: datetime, settings: Settings
) -> Told | None:
    """Record whether `name` holds now, and tell operators what they should
    hear of it (see the module's rules)."""
    told: Told | None = None
    with session_scope() as session:
        state = session.get(AlertState, name, with_for_update=True)
        if state is None:
            if not holds:
                return None
            state = AlertState(name=name, firing=False)
            session.add(state)
        recently = state.notified_at is not None and now - state.notified_at < REPEAT
        if holds and not state.firing:
            state.firing, state.since, state.detail = True, now, detail[:400]
            if not recently:
                told = Told(name, "firing", detail)
        elif holds and not recently:
            told = Told(name, "reminder", f"still, since {state.since:%Y-%m-%d %H:%M}Z: {detail}")
        elif not holds and state.firing:
            was_told = (
                state.notified_at is not None
                and state.since is not None
                and (state.notified_at >= state.since)
            )
            since = state.since
            state.firing, state.since, state.detail = False, None, None
            if was_told and since is not None:
                told = Told(name, "cleared", f"cleared after {_duration(now - since)}")
        if told is not None:
            state.notified_at = now
    if told is not None:
        title = {"firing": "⚠ ", "reminder": "⚠ ", "cleared": "✓ "}[told.what] + f"recovery: {name}"
        notify(title, told.text, settings)
    return told


def _duration(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


# -- conditions reported where they happen ------------------------------------------


def stripe_key_refused(status: int, now: datetime, settings: Settings) -> None:
    set_condition(
        STRIPE_KEY,
        True,
        f"Stripe answered {status}: the API key was revoked or rolled; set STRIPE_API_KEY",
        now,
        settings,
    )


def endpoint_disabled(endpoint_id: int, why: str, now: datetime, settings: Settings) -> None:
    set_condition(
        endpoint_condition(endpoint_id),
        True,
        f"webhook endpoint {endpoint_id} disabled: {why}"
        f" (recovery endpoints enable {endpoint_id} once it answers)",
        now,
        settings,
    )


def endpoint_enabled(endpoint_id: int, now: datetime, settings: Settings) -> None:
    set_condition(endpoint_condition(endpoint_id), False, "", now, settings)


# -- conditions read from the database, every minute ----------------------------------


def check(
    now: datetime, settings: Settings, key_works: Callable[[], bool] | None = None
) -> list[Told]:
    """Evaluate every condition read from the database; what operators were told.
    `key_works` asks Stripe whether the key is accepted again (only while a
    refused key is firing)."""
    told = []
    with session_scope() as session:
        failed_events = (
            session.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.status == EventStatus.FAILED)
            )
            or 0
        )
        overdue = (
            session.scalar(
                select(func.count())
                .select_from(RecoveryAttempt)
                .where(
                    RecoveryAttempt.status == StepStatus.SCHEDULED,
                    RecoveryAttempt.due_at
                    < now - timedelta(minutes=settings.alert_overdue_minutes),
                )
            )
            or 0
        )
        smtp_since = _smtp_refusing_since(session)
        today, week = _decline_rates(session, now)
        key_state = session.get(AlertState, STRIPE_KEY)
        key_firing = key_state is not None and key_state.firing
    checks = [
        (
            EVENT_FAILED,
            failed_events > 0,
            f"{failed_events} Stripe event(s) ended failed; see `recovery events list"
            " --status failed`, then `recovery events replay`",
        ),
        (
            STEPS_OVERDUE,
            overdue > 0,
            f"{overdue} due step(s) waiting over {settings.alert_overdue_minutes} min:"
            " are the workers and beat running?",
        ),
        (
            SMTP_REFUSING,
            smtp_since is not None and now - smtp_since >= SMTP_GRACE,
            f"the mail server has refused every email since {smtp_since:%H:%M}Z"
            if smtp_since
            else "",
        ),
    ]
    if today is not None:
        rate, charges = today
        rising = week is not None and charges >= DECLINE_MIN_CHARGES and rate > week + DECLINE_RISE
        checks.append(
            (
                DECLINE_RATE,
                rising,
                f"{rate:.0%} of today's {charges} retries declined, against"
                f" {week or 0:.0%} over the last week",
            )
        )
    else:
        checks.append((DECLINE_RATE, False, ""))
    if key_firing and key_works is not None and key_works():
        checks.append((STRIPE_KEY, False, ""))
    for name, holds, detail in checks:
        said = set_condition(name, holds, detail, now, settings)
        if said is not None:
            told.append(said)
    return told


def _smtp_refusing_since(session: Session) -> datetime | None:
    row = session.get(AlertState, SMTP_OBSERVED)
    return row.since if row is not None else None


def smtp_answered(refused: bool, now: datetime) -> None:
    """What the mail server did with a batch: refused every email (a
    transient error), or took one. Kept as when the refusals began."""
    with session_scope() as session:
        if not refused:
            session.execute(delete(AlertState).where(AlertState.name == SMTP_OBSERVED))
            return
        insert_ignore(
            session,
            AlertState,
            {"name": SMTP_OBSERVED, "firing": False, "since": now},
            ["name"],
        )


def _decline_rates(
    session: Session, now: datetime
) -> tuple[tuple[float, int] | None, float | None]:
    """Today's share of retries declined and their count; the trailing week's share."""
    charged = counts.CHARGE_ANSWERS

    def rate(since: datetime, until: datetime) -> tuple[float, int] | None:
        rows = dict(
            session.execute(
                select(RecoveryAttempt.outcome, func.count())
                .where(
                    RecoveryAttempt.kind == StepKind.RETRY,
                    RecoveryAttempt.outcome.in_(charged),
                    RecoveryAttempt.executed_at >= since,
                    RecoveryAttempt.executed_at < until,
                )
                .group_by(RecoveryAttempt.outcome)
            ).all()
        )
        total = sum(rows.values())
        return None if not total else (rows.get(StepOutcome.DECLINED, 0) / total, total)

    day = now - timedelta(days=1)
    week = rate(day - timedelta(days=7), day)
    return rate(day, now), (week[0] if week else None)


# -- the daily digest -----------------------------------------------------------------


def digest(now: datetime, settings: Settings) -> str:
    """The day in a few lines: what came back, what is open, what needs a person."""
    from recovery.money import format_totals

    day = now - timedelta(days=1)
    with session_scope() as session:
        recovered = counts.recovered_amounts(session, recovered_since=day)
        statuses = counts.cases_by_status(session)
        flagged = _count(
            session,
            select(func.count())
            .select_from(RecoveryCase)
            .where(RecoveryCase.status == CaseStatus.OPEN, RecoveryCase.flag_reason.is_not(None)),
        )
        failed_events = _count(
            session,
            select(func.count())
            .select_from(WebhookEvent)
            .where(WebhookEvent.status == EventStatus.FAILED),
        )
        failed_deliveries = _count(
            session,
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.status == DeliveryStatus.FAILED, Delivery.last_attempt_at >= day),
        )
        failed_emails = _count(
            session,
            select(func.count())
            .select_from(Message)
            .where(Message.status == MessageStatus.FAILED, Message.created_at >= day),
        )
    needs = [
        f"{flagged} case(s) flagged for review (FLAGGED in recovery cases list)" if flagged else "",
        f"{failed_events} failed Stripe event(s) (recovery events replay)" if failed_events else "",
        f"{failed_deliveries} webhook deliveries failed today" if failed_deliveries else "",
        f"{failed_emails} email(s) failed today (recovery emails list --status failed)"
        if failed_emails
        else "",
    ]
    lines = [
        f"Recovered in the last 24 hours: {format_totals(recovered) if recovered else 'nothing'}.",
        f"Open cases: {statuses.get('open', 0)}.",
        "Needs a person: " + ("; ".join(n for n in needs if n) or "nothing") + ".",
    ]
    body = "\n".join(lines)
    notify("recovery: daily digest", body, settings)
    return body


def _count(session: Session, query: Any) -> int:
    return int(session.scalar(query) or 0)
