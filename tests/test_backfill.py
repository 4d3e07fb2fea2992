"""Backfill against the Stripe-compatible server: pages, an interruption, resume;
events replayed from Stripe's Events API into the same inbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from recovery import clock, stripe_api
from recovery.cli import cli
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import scheduler
from recovery.inbox import backfill
from recovery.models import RecoveryCase, SyncCursor, WebhookEvent

from .factories import sim_post


def count(model) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model))


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_sync_pages_through_invoices_resumes_after_an_interruption(db, sim):
    failed = [sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})["invoice"] for _ in range(11)]
    paid = sim_post(sim.url, "/_sim/customers", {"card": {}})
    sim_post(
        sim.url, "/_sim/invoices", {"customer": paid["id"], "amount": 500}
    )  # open, never tried
    # Stripe answers 500 to the third page request: the first two pages are kept.
    pages = []

    def after_page(seen: int, queued: int) -> None:
        pages.append((seen, queued))
        if len(pages) == 2:
            sim_post(sim.url, "/_sim/faults", {"path_prefix": "/v1/invoices", "status": 500})

    with pytest.raises(stripe_api.StripeUnavailable):
        backfill.sync_invoices(clock.now(), page_size=4, on_page=after_page)
    # Newest first: the untried invoice is on the first page and is not queued.
    assert pages == [(4, 3), (4, 4)] and count(WebhookEvent) == 7
    with session_scope() as session:
        state = session.get(SyncCursor, "invoices")
        assert state.completed_at is None and state.seen == 8

    resumed = run("sync", "--page-size", "4")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after" in resumed.output
    assert count(WebhookEvent) == 11  # every failed invoice once; the untried one not at all
    again = run("sync", "--page-size", "4")
    assert again.exit_code == 0 and count(WebhookEvent) == 11  # a second run adds nothing

    scheduler.run_pass(get_settings(), sync=True)
    with session_scope() as session:
        opened = set(session.scalars(select(RecoveryCase.invoice_id)))
    assert opened == set(failed)


def test_events_replay_since_fills_the_inbox_gap(db, sim):
    for _ in range(3):
        sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    events = sim.state.events
    assert len(events) >= 3
    now = datetime.now(UTC)
    first = run("events", "replay", "--since", (now - timedelta(hours=1)).isoformat())
    assert first.exit_code == 0, first.output
    assert count(WebhookEvent) == len(events)
    second = run("events", "replay", "--since", (now - timedelta(hours=1)).isoformat())
    assert f"{len(events)} event(s)" in second.output and "0 new" in second.output
    assert count(WebhookEvent) == len(events)
    too_old = run("events", "replay", "--since", (now - timedelta(days=31)).isoformat())
    assert too_old.exit_code == 2 and "30 days" in too_old.output
    clock.set_now(None)
