"""What operators graph and alert on: Prometheus metrics, and the same at a
glance for `recovery status`.

Most of what matters is state the database already holds (the inbox's
backlog and its age, steps due and overdue, retries by Stripe's answer,
emails by status, what was recovered; each counted as counts.py defines
it), so it is read at scrape time: every web process answers the same, and
nothing is lost when a worker restarts. What the database does not hold,
the Stripe requests each process makes, is counted by prometheus-client;
with PROMETHEUS_MULTIPROC_DIR set (gunicorn's workers, Celery's prefork
children) every process writes its counts there and a scrape adds them up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import multiprocess as multiprocess_mode
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from recovery import counts
from recovery.models import (
    EventStatus,
    Message,
    RecoveryAttempt,
    StepKind,
    StepStatus,
    WebhookEvent,
)

# A step this much past due has waited for a worker longer than a dispatch
# pass takes: workers are missing or behind.
OVERDUE_AFTER = timedelta(minutes=5)

STRIPE_REQUESTS = Counter(
    "recovery_stripe_requests",
    "Requests to Stripe's API, by HTTP method and status (429: rate limited; network: no answer)",
    ["method", "status"],
)


@dataclass
class Snapshot:
    """The installation's state at one instant."""

    at: datetime
    events: dict[str, int] = field(default_factory=dict)  # by status
    oldest_waiting_event_seconds: float = 0.0  # pending or processing
    steps_due: dict[str, int] = field(default_factory=dict)  # scheduled and due, by kind
    steps_overdue: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)  # charges, by Stripe's answer
    # Retry steps that ended without a charge, by what stopped them.
    retry_steps_charged_nothing: dict[str, int] = field(default_factory=dict)
    emails: dict[str, int] = field(default_factory=dict)  # by status
    cases: dict[str, int] = field(default_factory=dict)  # by status
    recovered: dict[str, int] = field(default_factory=dict)  # minor units, by currency


def snapshot(session: Session, now: datetime) -> Snapshot:
    found = Snapshot(at=now)
    for event_status, count in session.execute(
        select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
    ):
        found.events[str(event_status)] = count
    oldest = session.scalar(
        select(func.min(WebhookEvent.received_at)).where(
            WebhookEvent.status.in_([EventStatus.PENDING, EventStatus.PROCESSING])
        )
    )
    if oldest is not None:
        found.oldest_waiting_event_seconds = max((now - oldest).total_seconds(), 0.0)
    for kind, due, overdue in session.execute(
        select(
            RecoveryAttempt.kind,
            func.count(),
            func.count().filter(RecoveryAttempt.due_at <= now - OVERDUE_AFTER),
        )
        .where(RecoveryAttempt.status == StepStatus.SCHEDULED, RecoveryAttempt.due_at <= now)
        .group_by(RecoveryAttempt.kind)
    ):
        found.steps_due[str(kind)] = due
        found.steps_overdue[str(kind)] = overdue
    retries = counts.retry_steps(session)
    found.retries = retries.charges
    found.retry_steps_charged_nothing = retries.charged_nothing
    for message_status, count in session.execute(
        select(Message.status, func.count()).group_by(Message.status)
    ):
        found.emails[str(message_status)] = count
    found.cases = counts.cases_by_status(session)
    found.recovered = counts.recovered_amounts(session)
    return found


def families(state: Snapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families."""
    # A gauge: events move from pending to processed, so a status's count falls too.
    events = GaugeMetricFamily(
        "recovery_events",
        "Stripe events stored, by what became of them",
        labels=["status"],
    )
    for event_status in EventStatus:
        events.add_metric([event_status.value], state.events.get(event_status.value, 0))
    yield events
    yield GaugeMetricFamily(
        "recovery_inbox_oldest_waiting_seconds",
        "Age of the oldest event not yet handled (0 when none waits)",
        value=state.oldest_waiting_event_seconds,
    )
    due = GaugeMetricFamily("recovery_steps_due", "Steps due now, by kind", labels=["kind"])
    overdue = GaugeMetricFamily(
        "recovery_steps_overdue",
        f"Steps due for over {int(OVERDUE_AFTER.total_seconds())} s, by kind",
        labels=["kind"],
    )
    for kind in StepKind:
        due.add_metric([kind.value], state.steps_due.get(kind.value, 0))
        overdue.add_metric([kind.value], state.steps_overdue.get(kind.value, 0))
    yield due
    yield overdue
    yield _labelled(
        CounterMetricFamily,
        "recovery_retries",
        "Retries made (charges that reached Stripe), by Stripe's answer",
        "outcome",
        state.retries,
    )
    yield _labelled(
        CounterMetricFamily,
        "recovery_retry_steps_charged_nothing",
        "Retry steps that ended without a charge, by what stopped them",
        "outcome",
        state.retry_steps_charged_nothing,
    )
    yield _labelled(
        GaugeMetricFamily, "recovery_emails", "Emails by status", "status", state.emails
    )
    yield _labelled(GaugeMetricFamily, "recovery_cases", "Cases by status", "status", state.cases)
    yield _labelled(
        CounterMetricFamily,
        "recovery_recovered_amount",
        "Amount recovered, in the currency's minor units",
        "currency",
        state.recovered,
    )


def _labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    label: str,
    counts: dict[str, int],
) -> Metric:
    """One metric family with a sample per label value."""
    found = family(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        found.add_metric([value], count)
    return found


class StateCollector(Collector):
    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from families(self._read())


def counters() -> CollectorRegistry:
    """The processes' own counts: summed from PROMETHEUS_MULTIPROC_DIR when
    the processes share one, else this process's."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess_mode.MultiProcessCollector(registry)
    else:
        registry.register(STRIPE_REQUESTS)
    return registry


def exposition(read: Callable[[], Snapshot]) -> bytes:
    """One scrape: the database's state and every process's counters."""
    registry = counters()
    registry.register(StateCollector(read))
    return generate_latest(registry)
