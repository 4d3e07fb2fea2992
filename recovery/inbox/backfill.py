"""Catching up with Stripe: failed invoices at install, events missed while down.

Both feed the same inbox the receiver writes to, so what they find is handled
exactly like a webhook: one row per event id (a second run adds nothing), the
workers open or update the cases.

    sync:   GET /v1/invoices?status=open, page by page ─▶ a synthetic
            `invoice.payment_failed` per attempted invoice ─▶ inbox; the page's
            rows and the cursor commit together, so an interrupted sync resumes
            at the page it had not finished.
    replay: GET /v1/events?created[gte]=… (Stripe keeps 30 days) ─▶ inbox.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from recovery import stripe_api
from recovery.db import insert_ignore, session_scope
from recovery.models import EventStatus, SyncCursor, WebhookEvent

EVENTS_RETENTION = timedelta(days=30)
SYNC = "invoices"


def _row(event: dict, now: datetime) -> dict:
    return {
        "stripe_event_id": event["id"],
        "type": event["type"],
        "account": event.get("account"),
        "livemode": bool(event.get("livemode")),
        "api_version": event.get("api_version"),
        "stripe_created_at": datetime.fromtimestamp(event["created"], UTC),
        "received_at": now,
        "payload": json.dumps(event),
        "status": EventStatus.PENDING.value,
        "attempts": 0,
        "available_at": now,
    }


def _store(session, event: dict, now: datetime) -> bool:
    return insert_ignore(session, WebhookEvent, _row(event, now), ["stripe_event_id"])


def failed(invoice: dict) -> bool:
    """Open, and Stripe has tried to collect it at least once."""
    return (
        invoice.get("status") == "open"
        and bool(invoice.get("attempted"))
        and (invoice.get("attempt_count") or 0) > 0
        and invoice.get("collection_method", "charge_automatically") == "charge_automatically"
    )


def failure_event(invoice: dict, now: datetime) -> dict:
    """The `invoice.payment_failed` Stripe sent for this attempt, as far as the
    invoice tells: the id names the invoice and attempt, so it is stored once."""
    return {
        "id": f"evt_sync_{invoice['id']}_{invoice.get('attempt_count') or 0}",
        "object": "event",
        "type": "invoice.payment_failed",
        "api_version": None,
        "created": int(now.timestamp()),
        "livemode": bool(invoice.get("livemode")),
        "data": {"object": invoice},
    }


def sync_invoices(
    now: datetime,
    page_size: int = 100,
    restart: bool = False,
    on_page: Callable[[int, int], None] | None = None,
) -> Progress:
    """Queue a failure for every open, attempted invoice; resumable."""
    last = None
    for last in sync_pages(now, page_size, restart):
        if on_page:
            on_page(last.page_seen, last.page_queued)
    if last is None:  # pragma: no cover - sync_pages yields after every page, one at least
        raise RuntimeError("the sync listed no page")
    return last


@dataclass
class Progress:
    seen: int
    queued: int
    page_seen: int
    page_queued: int
    cursor: str | None
    completed_at: datetime | None


def sync_pages(now: datetime, page_size: int = 100, restart: bool = False) -> Iterator[Progress]:
    """sync_invoices, one page at a time: yields the progress after each page."""
    with session_scope() as session:
        state = session.get(SyncCursor, SYNC)
        if state is None or restart or state.completed_at is not None:
            if state is not None:
                session.delete(state)
                session.flush()
            state = SyncCursor(name=SYNC, cursor=None, seen=0, queued=0, started_at=now)
            session.add(state)
        cursor = state.cursor
    while True:
        params: dict[str, Any] = {"status": "open", "limit": page_size}
        if cursor:
            params["starting_after"] = cursor
        page = stripe_api.list_invoices(**params)
        invoices = page.get("data") or []
        with session_scope() as session:
            state = session.get(SyncCursor, SYNC, with_for_update=True)
            if state is None:
                raise RuntimeError("another `recovery sync --restart` took over this sync")
            queued = sum(_store(session, failure_event(i, now), now) for i in invoices if failed(i))
            state.seen += len(invoices)
            state.queued += queued
            state.updated_at = now
            if invoices:
                state.cursor = cursor = invoices[-1]["id"]
            if not page.get("has_more") or not invoices:
                state.completed_at = now
            progress = Progress(
                state.seen, state.queued, len(invoices), queued, state.cursor, state.completed_at
            )
        yield progress
        if progress.completed_at is not None:
            return


def events_since(since: datetime, page_size: int = 100) -> Iterator[dict]:
    """Stripe's events created at or after `since`, newest first, every page."""
    cursor = None
    while True:
        params = {"created": {"gte": int(since.timestamp())}, "limit": page_size}
        if cursor:
            params["starting_after"] = cursor
        page = stripe_api.list_events(**params)
        events = page.get("data") or []
        yield from events
        if not page.get("has_more") or not events:
            return
        cursor = events[-1]["id"]


def replay_since(
    since: datetime, now: datetime, on_event: Callable[[bool], None] | None = None
) -> tuple[int, int]:
    """Store every event since `since` that the inbox lacks; (seen, new)."""
    if since < now - EVENTS_RETENTION:
        raise ValueError("Stripe keeps events for 30 days; --since must be within them")
    seen = new = 0
    for event in events_since(since):
        with session_scope() as session:
            stored = _store(session, event, now)
        seen, new = seen + 1, new + int(stored)
        if on_event:
            on_event(stored)
    return seen, new


def last_sync() -> SyncCursor | None:
    with session_scope() as session:
        state = session.scalars(select(SyncCursor).where(SyncCursor.name == SYNC)).one_or_none()
        if state is not None:
            session.expunge(state)
        return state
