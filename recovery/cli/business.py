"""Operator commands for the business's side: webhook endpoints, alerts, API keys."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import click
from sqlalchemy import func, select

from recovery import clock
from recovery.business import alerts, announce, api_keys, deliveries, endpoints
from recovery.cli.common import DatabaseGroup, emit_json, first, instant_option
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.models import AlertState, Announcement, ApiKey, Delivery, DeliveryStatus, Endpoint


def _refused(exc: endpoints.EndpointRefused) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group("endpoints", cls=DatabaseGroup)
def endpoints_group() -> None:
    """The business's webhook endpoints: signed events about its cases
    (docs/webhooks.md)."""


@endpoints_group.command("add")
@click.argument("url")
@click.option(
    "--events",
    help="Comma-separated event types it hears (default: all), e.g."
    " case.recovered,case.final_action_scheduled",
)
def endpoints_add(url: str, events: str | None) -> None:
    """Add an endpoint; its signing secret is printed once.

    \b
    Example:
      recovery endpoints add https://app.example.com/hooks/recovery --events case.recovered
    """
    now, settings = clock.now(), get_settings()
    try:
        wanted = endpoints.event_types(events)
        with session_scope() as session:
            endpoint, secret = endpoints.add(session, url, wanted, now, settings)
            endpoint_id = endpoint.id
    except endpoints.EndpointRefused as exc:
        raise _refused(exc) from None
    click.echo(f"endpoint {endpoint_id} added, hearing {events or 'every event'}.")
    click.echo(f"signing secret (shown once; verify with a Standard Webhooks library):\n{secret}")


@endpoints_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def endpoints_list(as_json: bool) -> None:
    """Every endpoint, what it hears and how its deliveries stand (no secrets).

    \b
    Example:
      recovery endpoints list
    """
    with session_scope() as session:
        rows: list[dict[str, Any]] = []
        for endpoint in session.scalars(select(Endpoint).order_by(Endpoint.id)):
            counts = dict(
                session.execute(
                    select(Delivery.status, func.count())
                    .where(Delivery.endpoint_id == endpoint.id)
                    .group_by(Delivery.status)
                ).all()
            )
            rows.append(
                {
                    "id": endpoint.id,
                    "url": endpoint.url,
                    "status": endpoint.status.value,
                    "disabled_reason": endpoint.disabled_reason,
                    "events": endpoint.events,
                    "rotating_until": endpoint.previous_secret_until
                    if endpoint.previous_secret_until
                    and endpoint.previous_secret_until > clock.now()
                    else None,
                    "deliveries": {status.value: n for status, n in counts.items()},
                }
            )
    if as_json:
        return emit_json(rows)
    for r in rows:
        tally = " ".join(f"{k} {v}" for k, v in sorted(r["deliveries"].items())) or "none yet"
        heard = ",".join(r["events"]) if r["events"] else "every event"
        why = f" ({r['disabled_reason']})" if r["disabled_reason"] else ""
        click.echo(f"{r['id']:>4}  {r['status']}{why}  {r['url']}\n      hears {heard}; {tally}")
    click.echo(f"\n{len(rows)} endpoint(s).")


def _switch(endpoint_id: int, enabled: bool) -> None:
    now, settings = clock.now(), get_settings()
    try:
        with session_scope() as session:
            endpoint = endpoints.get(session, endpoint_id)
            endpoints.set_enabled(session, endpoint, enabled, now)
    except endpoints.EndpointRefused as exc:
        raise _refused(exc) from None
    if enabled:
        alerts.endpoint_enabled(endpoint_id, now, settings)
    state = "enabled: what waited is delivered now" if enabled else "disabled: events wait for it"
    click.echo(f"endpoint {endpoint_id} {state}.")


@endpoints_group.command("disable")
@click.argument("endpoint_id", type=int)
def endpoints_disable(endpoint_id: int) -> None:
    """Stop delivering to an endpoint; its events keep (`enable` sends them).

    \b
    Example:
      recovery endpoints disable 2
    """
    _switch(endpoint_id, False)


@endpoints_group.command("enable")
@click.argument("endpoint_id", type=int)
def endpoints_enable(endpoint_id: int) -> None:
    """Deliver to an endpoint again, what waited first.

    \b
    Example:
      recovery endpoints enable 2
    """
    _switch(endpoint_id, True)


@endpoints_group.command("rotate-secret")
@click.argument("endpoint_id", type=int)
def endpoints_rotate(endpoint_id: int) -> None:
    """A new signing secret, printed once; the old one signs beside it for 24 h.

    \b
    Example:
      recovery endpoints rotate-secret 2
    """
    now = clock.now()
    try:
        with session_scope() as session:
            secret = endpoints.rotate(session, endpoints.get(session, endpoint_id), now)
    except endpoints.EndpointRefused as exc:
        raise _refused(exc) from None
    until = now + endpoints.ROTATION_OVERLAP
    click.echo(f"new signing secret for endpoint {endpoint_id} (shown once):\n{secret}")
    click.echo(f"both secrets sign every delivery until {until:%Y-%m-%d %H:%M}Z.")


@endpoints_group.command("test")
@click.argument("endpoint_id", type=int)
def endpoints_test(endpoint_id: int) -> None:
    """Send a `ping` now and print the endpoint's answer (a disabled one too).

    \b
    Example:
      recovery endpoints test 2
    """
    now, settings = clock.now(), get_settings()
    try:
        with session_scope() as session:
            endpoint = endpoints.get(session, endpoint_id, lock=False)
            delivery = announce.ping(session, endpoint, now)
            delivery.status = DeliveryStatus.CLAIMED
            delivery.lease_until = now + deliveries.LEASE
            delivery_id = delivery.id
    except endpoints.EndpointRefused as exc:
        raise _refused(exc) from None
    started = time.monotonic()
    batch = deliveries.Batch(endpoint_id, [delivery_id])
    outcome = deliveries.send(batch, settings, even_disabled=True)[delivery_id]
    took = time.monotonic() - started
    with session_scope() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None  # noqa: S101 - made above
        code, error, body = row.last_status_code, row.last_error, row.response_body
    said = f"HTTP {code}" if code is not None else error
    click.echo(f"ping to endpoint {endpoint_id}: {said} in {took:.2f} s ({outcome}).")
    if body:
        click.echo(f"its answer: {body[:200]}")
    if outcome != "delivered":
        raise SystemExit(1)


@endpoints_group.command("deliveries")
@click.option("--endpoint", "endpoint_id", type=int, help="Only this endpoint's.")
@click.option("--status", type=click.Choice([s.value for s in DeliveryStatus]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def endpoints_deliveries(
    endpoint_id: int | None, status: str | None, limit: int, as_json: bool
) -> None:
    """Recent deliveries, newest first: attempts, the last answer, what is next.

    \b
    Example:
      recovery endpoints deliveries --status failed
    """
    with session_scope() as session:
        query = (
            select(Delivery, Announcement)
            .join(Announcement, Announcement.id == Delivery.announcement_id)
            .order_by(Delivery.id.desc())
            .limit(limit + 1)
        )
        if endpoint_id is not None:
            query = query.where(Delivery.endpoint_id == endpoint_id)
        if status:
            query = query.where(Delivery.status == status)
        rows = [
            {
                "id": d.id,
                "endpoint": d.endpoint_id,
                "webhook_id": a.public_id,
                "type": a.type,
                "case_id": a.case_id,
                "sequence": a.sequence,
                "status": d.status.value,
                "attempts": d.attempts,
                "last_status_code": d.last_status_code,
                "last_error": d.last_error,
                "next_attempt_at": d.next_attempt_at
                if d.status is DeliveryStatus.PENDING
                else None,
                "delivered_at": d.delivered_at,
            }
            for d, a in session.execute(query)
        ]
    rows = first(rows, limit)
    if as_json:
        return emit_json(rows)
    for r in rows:
        answer = f"HTTP {r['last_status_code']}" if r["last_status_code"] else r["last_error"] or ""
        next_at = r["next_attempt_at"]
        then = f"  next {next_at:%Y-%m-%d %H:%M:%S}Z" if next_at else ""
        click.echo(
            f"{r['id']:>7}  endpoint {r['endpoint']:<3} {r['type']:<32}"
            f" case {r['case_id'] or '-':<6} {r['status']:<9}"
            f" {r['attempts']:>2} tries  {answer}{then}".rstrip()
        )
    click.echo(f"\n{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}, the newest first.")


@endpoints_group.command("replay")
@click.option("--since", required=True, help="ISO 8601 instant, e.g. 2026-12-01T00:00Z.")
@click.option("--endpoint", "endpoint_id", type=int, help="Only this endpoint (default: all).")
def endpoints_replay(since: str, endpoint_id: int | None) -> None:
    """Deliver every event since T again, with the same webhook-ids.

    \b
    Example:
      recovery endpoints replay --since 2026-12-01T00:00Z --endpoint 2
    """
    start: datetime = instant_option(since, "--since")
    now = clock.now()
    try:
        with session_scope() as session:
            if endpoint_id is not None:
                chosen = [endpoints.get(session, endpoint_id)]
            else:
                chosen = list(session.scalars(select(Endpoint).order_by(Endpoint.id)))
            counts = {e.id: endpoints.replay(session, e, start, now) for e in chosen}
    except endpoints.EndpointRefused as exc:
        raise _refused(exc) from None
    for endpoint_id_, count in counts.items():
        click.echo(
            f"endpoint {endpoint_id_}: {count} event(s) since {start:%Y-%m-%d %H:%M}Z queued."
        )


@click.group("alerts", cls=DatabaseGroup)
def alerts_group() -> None:
    """Alerts to operators through ALERT_URLS (apprise: Slack, Teams, email…)."""


@alerts_group.command("test")
def alerts_test() -> None:
    """Send a test alert to every ALERT_URLS service.

    \b
    Example:
      ALERT_URLS=json://alerts.example.com/recovery recovery alerts test
    """
    settings = get_settings()
    if not settings.alert_urls:
        raise click.ClickException("ALERT_URLS is empty: alerts are only logged")
    sent = alerts.notify(
        "recovery: test alert", "If you read this, recovery's alerts reach you.", settings
    )
    if not sent:
        raise click.ClickException(
            f"not every one of the {len(settings.alert_urls)} ALERT_URLS took it; see the log"
        )
    click.echo(f"sent to {len(settings.alert_urls)} alert service(s).")


@alerts_group.command("list")
def alerts_list() -> None:
    """The conditions operators are alerted to, and which hold now.

    \b
    Example:
      recovery alerts list
    """
    with session_scope() as session:
        rows = session.scalars(select(AlertState).order_by(AlertState.name)).all()
        shown = [
            (r.name, r.firing, r.since, r.detail) for r in rows if r.name != alerts.SMTP_OBSERVED
        ]
    for name, firing, since, detail in shown:
        state = f"FIRING since {since:%Y-%m-%d %H:%M}Z: {detail}" if firing else "clear"
        click.echo(f"{name:<24} {state}")
    firing_now = sum(1 for _, f, _, _ in shown if f)
    click.echo(f"\n{firing_now} condition(s) firing.")


@click.group("api-keys", cls=DatabaseGroup)
def api_keys_group() -> None:
    """Keys for the status API the business's app calls (docs/app.md)."""


@api_keys_group.command("create")
@click.option("--name", required=True, help="Who uses it, e.g. app.")
@click.option(
    "--scopes",
    default="status,links",
    show_default=True,
    help="status: read a customer's standing; links: with a fresh link to fix it.",
)
def api_keys_create(name: str, scopes: str) -> None:
    """Make a key; it is printed once (only its hash is kept).

    \b
    Example:
      recovery api-keys create --name app
    """
    try:
        wanted = api_keys.scopes_of(scopes)
        with session_scope() as session:
            key = api_keys.create(session, name, wanted, clock.now())
    except api_keys.KeyRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"API key {name!r} ({', '.join(wanted)}), shown once:\n{key}")


@api_keys_group.command("list")
def api_keys_list() -> None:
    """Every key: name, scopes, last used, revoked (never the key).

    \b
    Example:
      recovery api-keys list
    """
    with session_scope() as session:
        rows = [
            (k.id, k.name, k.scopes, k.last_used_at, k.revoked_at)
            for k in session.scalars(select(ApiKey).order_by(ApiKey.id))
        ]
    for key_id, name, scopes, used, revoked in rows:
        state = f"revoked {revoked:%Y-%m-%d %H:%M}Z" if revoked else "live"
        last = f"last used {used:%Y-%m-%d %H:%M}Z" if used else "never used"
        click.echo(f"{key_id:>4}  {name:<20} {','.join(scopes):<14} {state}, {last}")
    click.echo(f"\n{len(rows)} key(s).")


@api_keys_group.command("revoke")
@click.argument("key_id", type=int)
def api_keys_revoke(key_id: int) -> None:
    """Refuse a key from its next request on.

    \b
    Example:
      recovery api-keys revoke 3
    """
    try:
        with session_scope() as session:
            api_keys.revoke(session, key_id, clock.now())
    except api_keys.KeyRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"API key {key_id} revoked: refused from now on.")


COMMANDS = [endpoints_group, alerts_group, api_keys_group]
