"""The inbox after the receiver: relay stored events to workers, where each is
handed to the handler the caller gives (engine/events.py in production).

The database is the record; the broker only carries ids. The relay publishes
due inbox rows in batches (one message per batch, so ingestion is bound by the
database, not the broker) and the same relay is the sweep that re-sends what a
down broker, a dead worker or a failed try left behind:

    pending ──claim──▶ processing ──▶ processed | ignored
       ▲                   │
       └── error, backoff ─┴──▶ failed (after the last try; `recovery events replay`)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, or_, select, text, update
from sqlalchemy.orm import Session

from recovery import clock
from recovery.config import Settings
from recovery.db import dialect_of, rows_changed, session_scope
from recovery.models import EventStatus, WebhookEvent
from recovery.observability import scrub_text
from recovery.stripe_api import StripeFailure

log = structlog.get_logger("recovery.inbox")

# How long a published or claimed event may stay unfinished before the sweep
# hands it out again (a lost message, a worker killed mid-event).
LEASE = timedelta(minutes=5)
PUBLISH_CHUNK = 50


_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO OFF")

# 30 s, 1 min, 2 min, … at most an hour between tries of an event.
EVENT_RETRY_CAP = timedelta(hours=1)

# What a stored event is handed to, in the transaction that marks it done;
# returns the status it ends in (processed or ignored).
Handler = Callable[[Session, dict[str, Any], datetime, Settings], EventStatus]


def due(now: datetime) -> ColumnElement[bool]:
    """The events relay publishes at `now`."""
    return or_(
        (WebhookEvent.status == EventStatus.PENDING)
        & (WebhookEvent.available_at <= now)
        & or_(WebhookEvent.enqueued_at.is_(None), WebhookEvent.enqueued_at <= now - LEASE),
        # A claim whose worker died: its lease (available_at) has run out.
        (WebhookEvent.status == EventStatus.PROCESSING) & (WebhookEvent.available_at <= now),
    )


def relay(publish: Callable[[list[int]], None], now: datetime, page_size: int) -> int:
    """Publish the ids of every due event, a chunk per message, a page of rows
    per transaction; returns how many. A sweep hands out the whole backlog,
    so draining one (after a broker outage, a billing run) takes as long as
    the workers need, not a beat period per page."""
    total = 0
    while True:
        sent, more = _relay_page(publish, now, page_size)
        total += sent
        if not more:
            break
    if total:
        log.info("relay_published", events=total)
    return total


def republish_lost(now: datetime) -> int:
    """The broker lost what it held (Redis restarted with an empty memory):
    every event published and not yet taken by a worker is due again now,
    rather than when its lease runs out. A second message for an event a
    worker did take changes nothing: workers claim events in the database."""
    with session_scope() as session:
        count = rows_changed(
            session.execute(
                update(WebhookEvent)
                .where(
                    WebhookEvent.status == EventStatus.PENDING,
                    WebhookEvent.enqueued_at.is_not(None),
                )
                .values(enqueued_at=None)
            )
        )
    if count:
        log.warning("relay_republishing_lost", events=count)
    return count


def _relay_page(
    publish: Callable[[list[int]], None], now: datetime, page_size: int
) -> tuple[int, bool]:
    """One page: how many were published, and whether to go on."""
    with session_scope() as session:
        query = select(WebhookEvent.id).where(due(now)).order_by(WebhookEvent.id)
        query = query.limit(page_size)
        if dialect_of(session) == "postgresql":
            # Two relays (two beats) never publish the same rows at once.
            query = query.with_for_update(skip_locked=True)
        ids = list(session.scalars(query))
        sent: list[int] = []
        for start in range(0, len(ids), PUBLISH_CHUNK):
            chunk = ids[start : start + PUBLISH_CHUNK]
            try:
                publish(chunk)
            except Exception as exc:  # noqa: BLE001 - any broker failure: rows wait
                log.warning("relay_publish_failed", error=type(exc).__name__, waiting=len(ids))
                break
            sent.extend(chunk)
        if sent:
            # Published rows leave the due set until their lease runs out,
            # which is what ends the loop above.
            session.execute(
                update(WebhookEvent).where(WebhookEvent.id.in_(sent)).values(enqueued_at=now)
            )
    return len(sent), len(ids) == page_size and len(sent) == len(ids)


def _claim(event_ids: Sequence[int], now: datetime, settings: Settings) -> dict[int, int]:
    """Take a batch of events for this worker, in one transaction; returns the
    attempt number of each event taken (others are not ours to do)."""
    with session_scope() as session:
        # A claim that outlived its lease on the last try (its worker died, or
        # the event kills whatever handles it) ends here, not in another try.
        session.execute(
            update(WebhookEvent)
            .where(
                WebhookEvent.id.in_(list(event_ids)),
                WebhookEvent.status == EventStatus.PROCESSING,
                WebhookEvent.available_at <= now,
                WebhookEvent.attempts >= settings.event_max_attempts,
            )
            .values(
                status=EventStatus.FAILED,
                last_error="the last try did not finish within its lease",
                enqueued_at=None,
            )
        )
        claimed = session.execute(
            update(WebhookEvent)
            .where(
                WebhookEvent.id.in_(list(event_ids)),
                WebhookEvent.status.in_([EventStatus.PENDING, EventStatus.PROCESSING]),
                WebhookEvent.available_at <= now,
            )
            .values(
                status=EventStatus.PROCESSING,
                attempts=WebhookEvent.attempts + 1,
                available_at=now + LEASE,
            )
            .returning(WebhookEvent.id, WebhookEvent.attempts)
        )
        return {event_id: attempt for event_id, attempt in claimed}


def _describe(exc: BaseException) -> str:
    # Our own error types carry Stripe's message (object ids and codes only);
    # anything else is scrubbed and cut short.
    text = f"{type(exc).__name__}: {exc}"
    return scrub_text(text)[:500]


def process_event(event_id: int, now: datetime, settings: Settings, handle: Handler) -> str | None:
    """Process one inbox event; returns its new status, or None if not ours to do."""
    return process_events([event_id], now, settings, handle)[event_id]


def _process_claimed(
    event_id: int, attempt: int, now: datetime, settings: Settings, handle: Handler
) -> str | None:
    structlog.contextvars.bind_contextvars(inbox_id=event_id)
    try:
        with session_scope() as session:
            if dialect_of(session) == "postgresql":
                # The event's effects and its status commit together, so a
                # commit lost in a crash loses both, and the lease hands the
                # event out again: waiting for the disk buys nothing here.
                session.execute(_ASYNC_COMMIT)
            row = session.get(WebhookEvent, event_id, with_for_update=True)
            if row is None or row.status != EventStatus.PROCESSING or row.attempts != attempt:
                return None  # another worker took over after our lease ran out
            structlog.contextvars.bind_contextvars(
                event_id=row.stripe_event_id, event_type=row.type
            )
            status = handle(session, json.loads(row.payload), now, settings)
            row.status = status
            row.processed_at = now
            row.last_error = None
        log.info("event_processed", status=status, attempt=attempt)
        return status
    except Exception as exc:  # noqa: BLE001 - recorded, retried, shown to operators
        return _record_failure(event_id, attempt, exc, now, settings)
    finally:
        structlog.contextvars.unbind_contextvars("inbox_id", "event_id", "event_type")


def _record_failure(
    event_id: int, attempt: int, exc: Exception, now: datetime, settings: Settings
) -> str:
    final = attempt >= settings.event_max_attempts
    status = EventStatus.FAILED if final else EventStatus.PENDING
    with session_scope() as session:
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id, WebhookEvent.attempts == attempt)
            .values(
                status=status,
                last_error=_describe(exc),
                enqueued_at=None,
                available_at=now + clock.doubling(attempt, EVENT_RETRY_CAP),
            )
        )
    retryable = isinstance(exc, StripeFailure)
    (log.error if final else log.warning)(
        "event_failed",
        attempt=attempt,
        final=final,
        error=type(exc).__name__,
        expected=retryable,
        exc_info=not retryable,
    )
    return status.value


def process_events(
    ids: Sequence[int], now: datetime, settings: Settings, handle: Handler
) -> dict[int, str | None]:
    """Process a batch, claimed at once, each event in its own transaction; one
    event that cannot even record its failure leaves the others unharmed (it
    stays claimed until its lease runs out, and fails for good when that was
    its last try)."""
    attempts = _claim(ids, now, settings) if ids else {}
    outcomes: dict[int, str | None] = {}
    for event_id in ids:
        if event_id not in attempts:
            outcomes[event_id] = None
            continue
        try:
            outcomes[event_id] = _process_claimed(
                event_id, attempts[event_id], now, settings, handle
            )
        except Exception as exc:  # noqa: BLE001 - the rest of the batch goes on
            log.error("event_unrecorded", inbox_id=event_id, error=type(exc).__name__)
            outcomes[event_id] = None
    return outcomes


def replay(event_ids: Sequence[int], now: datetime) -> int:
    """Put events back in the queue (operators: after fixing what failed them)."""
    with session_scope() as session:
        return rows_changed(
            session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(list(event_ids)))
                .values(
                    status=EventStatus.PENDING,
                    attempts=0,
                    enqueued_at=None,
                    available_at=now,
                    last_error=None,
                )
            )
        )
