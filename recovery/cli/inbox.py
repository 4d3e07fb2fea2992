"""Operator commands for the inbox: stored events, replaying them, and catching
up with Stripe (events missed while down, failed invoices at install).

The commands that fetch from Stripe or hand events on import those parts
when they run: listing the inbox need not load the Stripe SDK.
"""

from __future__ import annotations

import json
import sys

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import clock
from recovery.cli.common import DatabaseGroup, first, instant_option, needs_database
from recovery.db import session_scope
from recovery.models import EventStatus, WebhookEvent


@click.group(cls=DatabaseGroup)
def events() -> None:
    """Stored Stripe events: the inbox."""


def _event_row(session: Session, ref: str) -> WebhookEvent:
    query = select(WebhookEvent)
    if ref.isdigit():
        query = query.where(WebhookEvent.id == int(ref))
    else:
        query = query.where(WebhookEvent.stripe_event_id == ref)
    row = session.scalars(query).one_or_none()
    if row is None:
        raise click.ClickException(f"no event {ref!r}")
    return row


@events.command("list")
@click.option("--status", type=click.Choice([s.value for s in EventStatus]))
@click.option("--type", "event_type")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def events_list(status: str | None, event_type: str | None, limit: int, as_json: bool) -> None:
    """The newest events first.

    \b
    Examples:
      recovery events list --status failed
      recovery events list --type invoice.payment_failed --json
    """
    with session_scope() as session:
        query = select(WebhookEvent).order_by(WebhookEvent.id.desc()).limit(limit + 1)
        if status:
            query = query.where(WebhookEvent.status == status)
        if event_type:
            query = query.where(WebhookEvent.type == event_type)
        rows = first(list(session.scalars(query)), limit)
        if as_json:
            click.echo(
                json.dumps(
                    [
                        {
                            "id": row.id,
                            "stripe_event_id": row.stripe_event_id,
                            "type": row.type,
                            "status": row.status,
                            "attempts": row.attempts,
                            "received_at": row.received_at.isoformat(),
                            "last_error": row.last_error,
                        }
                        for row in rows
                    ],
                    indent=2,
                )
            )
            return
        click.echo(
            f"{'id':>6}  {'status':<10} {'tries':>5}  {'received (UTC)':<19}  "
            f"{'type':<34} stripe id"
        )
        for row in rows:
            click.echo(
                f"{row.id:>6}  {row.status:<10} {row.attempts:>5}  "
                f"{row.received_at:%Y-%m-%d %H:%M:%S}  {row.type:<34} "
                f"{row.stripe_event_id}"
            )
        click.echo(f"\n{len(rows)} event(s), the newest first.")


@events.command("show")
@click.argument("ref")
def events_show(ref: str) -> None:
    """One event: REF is the inbox id or the Stripe event id.

    \b
    Example:
      recovery events show evt_1NG8Du2eZvKYlo2CUI79vXWy
    """
    with session_scope() as session:
        row = _event_row(session, ref)
        for label, value in [
            ("id", row.id),
            ("stripe id", row.stripe_event_id),
            ("type", row.type),
            ("status", row.status),
            ("attempts", row.attempts),
            ("livemode", row.livemode),
            ("account", row.account),
            ("created", row.stripe_created_at),
            ("received", row.received_at),
            ("processed", row.processed_at),
            ("next try", row.available_at if row.status is EventStatus.PENDING else None),
            ("last error", row.last_error),
        ]:
            click.echo(f"{label:>10}: {value if value is not None else '-'}")
        obj = json.loads(row.payload)["data"]["object"]
        click.echo(f"{'object':>10}: {obj.get('object')} {obj.get('id')}")


@events.command("replay")
@click.argument("refs", nargs=-1)
@click.option("--failed", is_flag=True, help="Replay every failed event.")
@click.option(
    "--since",
    help="Fetch Stripe's events since this instant (ISO 8601, within 30 days) into the inbox.",
)
def events_replay(refs: tuple[str, ...], failed: bool, since: str | None) -> None:
    """Process events again: by id, all --failed ones, or fetched from Stripe --since.

    \b
    Examples:
      recovery events replay evt_1NG8Du2eZvKYlo2CUI79vXWy
      recovery events replay --failed
      recovery events replay --since 2026-11-20T08:00Z   # after the receiver was down
    """
    if not refs and not failed and not since:
        raise click.UsageError("name event ids, or pass --failed or --since")
    if since:
        return _replay_from_stripe(since)
    with session_scope() as session:
        ids = [_event_row(session, ref).id for ref in refs]
        if failed:
            ids += session.scalars(
                select(WebhookEvent.id).where(WebhookEvent.status == EventStatus.FAILED)
            ).all()
    from recovery.inbox import relay

    count = relay.replay(ids, clock.now())
    click.echo(f"{count} event(s) queued again")


def _replay_from_stripe(since: str) -> None:
    from recovery import stripe_api
    from recovery.inbox import backfill

    instant = instant_option(since, "--since")
    counts = {"new": 0}

    def count(stored: bool) -> None:
        counts["new"] += int(stored)

    try:
        seen, new = backfill.replay_since(instant, clock.now(), count)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    except stripe_api.StripeUnavailable as exc:
        click.echo(
            f"Stripe unavailable after {counts['new']} new event(s): {exc}; run it again", err=True
        )
        raise SystemExit(3) from None
    click.echo(
        f"{seen} event(s) from Stripe since {instant:%Y-%m-%d %H:%M}Z; {new} new in the inbox"
    )


@click.command()
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1, 100))
@click.option("--restart", is_flag=True, help="Start from the newest invoice again.")
@needs_database
def sync(page_size: int, restart: bool) -> None:
    """Backfill at install: open cases for Stripe's open invoices that failed.

    Lists the account's open invoices page by page and queues a failure for
    each one Stripe has tried to collect; the workers (or `recovery tick
    --sync`) open the cases. Running it twice adds nothing; an interrupted
    run resumes where it stopped.

    \b
    Examples:
      recovery sync
      recovery sync --restart && recovery tick --sync
    """
    from recovery import stripe_api
    from recovery.inbox import backfill

    previous = backfill.last_sync()
    if previous is not None and previous.completed_at is None and not restart:
        click.echo(f"resuming after {previous.cursor} ({previous.seen} invoices seen)", err=True)
    last = None
    pages = backfill.sync_pages(clock.now(), page_size, restart)
    # Stripe's lists carry no total: the bar counts pages and shows the tally.
    with click.progressbar(
        pages,
        label="Listing open invoices",
        file=sys.stderr,
        item_show_func=lambda p: p and f"{p.seen} seen, {p.queued} failures queued",
    ) as bar:
        try:
            for progress in bar:
                last = progress
        except stripe_api.StripeUnavailable as exc:
            seen = last.seen if last else 0
            click.echo(
                f"\nStripe unavailable after {seen} invoice(s): {exc}; run `recovery sync`"
                " again to resume",
                err=True,
            )
            raise SystemExit(3) from None
    if last is None:  # pragma: no cover - the sync yields after every page, one at least
        raise click.ClickException("the sync listed no page")
    click.echo(
        f"{last.seen} open invoice(s) seen, {last.queued} failure(s) queued;"
        " the workers open the cases (or run `recovery tick --sync`)"
    )


COMMANDS = [events, sync]
