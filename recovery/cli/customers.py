"""Operator commands for the customer side: emails and links."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from sqlalchemy import select

from recovery import clock
from recovery.cli.common import (
    DatabaseGroup,
    Unavailable,
    emit_json,
    find_case,
    first,
    needs_database,
    operator,
)
from recovery.config import get_settings
from recovery.customers import delivery, emails, mailer
from recovery.db import session_scope
from recovery.engine import cases
from recovery.models import Customer, Message, MessageStatus


@click.group("emails")
def emails_group() -> None:
    """Dunning emails: preview them, send a test, list the outbox."""


def _facts_for_case(ref: str, name: str, locale: str | None) -> emails.Facts:
    with session_scope() as session:
        case = find_case(session, ref)
        customer = session.get(Customer, case.customer_id) if case.customer_id else None
        if customer is None:
            raise click.ClickException(f"case {case.id} has no customer to write to")
        preview = Message(case_id=case.id, template=name, step="preview", key="preview")
        # A preview mints no link: it shows where links go, not working ones.
        urls = {
            w.purpose: f"https://billing.example.com/{w.purpose.value}/preview-link"
            for w in delivery.links_wanted(preview, case, customer)
        }
        dates = delivery.plan_dates(session, [case], get_settings())[case.id]
        facts = delivery.facts(preview, case, customer, dates, urls, clock.now())
    return dataclasses.replace(facts, locale=locale or facts.locale)


@emails_group.command("preview")
@click.argument("name", type=click.Choice(emails.NAMES))
@click.option("--case", "case_ref", help="Render with this case's facts (id or in_…).")
@click.option("--locale", help="Locale for amounts and dates, e.g. de_DE, ja_JP.")
@click.option("--currency", default="usd", show_default=True, help="Sample data only.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the HTML.")
@click.option("--text", "show_text", is_flag=True, help="Print the plain-text part.")
def emails_preview(
    name: str,
    case_ref: str | None,
    locale: str | None,
    currency: str,
    out: Path | None,
    show_text: bool,
) -> None:
    """Render an email with a real case or realistic sample data.

    \b
    Examples:
      recovery emails preview payment_failed --locale de_DE --currency eur --out pf.html
      recovery emails preview final_notice --case in_1MtHbELkdIwHu7ix --text
    """
    settings = get_settings()
    if case_ref:
        facts = _facts_for_case(case_ref, name, locale)
    else:
        facts = emails.sample_facts(name, locale or "en_US", currency, settings.public_base_url)
    rendered = emails.render(name, facts, settings)
    click.echo(f"Subject: {rendered.subject}")
    if show_text or not out:
        click.echo("")
        click.echo(rendered.text)
    if out:
        out.write_text(rendered.html, encoding="utf-8")
        click.echo(f"HTML written to {out}")


@emails_group.command("send-test")
@click.argument("name", type=click.Choice(emails.NAMES))
@click.option("--to", "address", required=True, help="Where to send it.")
@click.option("--locale", default="en_US", show_default=True)
@click.option("--currency", default="usd", show_default=True)
def emails_send_test(name: str, address: str, locale: str, currency: str) -> None:
    """Send one email with sample data through the configured transport.

    \b
    Example:
      recovery emails send-test payment_failed --to me@example.com
    """
    if "@" not in address:
        raise click.BadParameter(f"{address!r} is not an email address", param_hint="--to")
    settings = get_settings()
    facts = emails.sample_facts(name, locale, currency, settings.public_base_url)
    rendered = emails.render(name, facts, settings)
    message = mailer.build(rendered, address, settings, subject_prefix="[test] ")
    try:
        mailer.transport_for(settings).send(message)
    except mailer.SendFailed as failed:
        if failed.permanent:
            raise click.ClickException(f"not sent: {failed}") from None
        raise Unavailable(f"not sent, the mail server is unavailable: {failed}") from None
    where = (
        f"{settings.smtp_host}:{settings.smtp_port}" if settings.smtp_host else settings.outbox_dir
    )
    click.echo(f"sent {name} via {where}")


@emails_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in MessageStatus]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
@needs_database
def emails_list(status: str | None, limit: int, as_json: bool) -> None:
    """The outbox, newest first; `--status failed` shows what needs a look.

    \b
    Example:
      recovery emails list --status failed
    """
    with session_scope() as session:
        query = select(Message).order_by(Message.id.desc()).limit(limit + 1)
        if status:
            query = query.where(Message.status == status)
        rows = [
            {
                "id": m.id,
                "case_id": m.case_id,
                "template": m.template,
                "status": m.status,
                "attempts": m.attempts,
                "sent_at": m.sent_at,
                "last_error": m.last_error,
            }
            for m in session.scalars(query)
        ]
    rows = first(rows, limit)
    if as_json:
        return emit_json(rows)
    for r in rows:
        click.echo(
            f"{r['id']:>7}  case {r['case_id'] or '-':<7} {r['template']:<24} {r['status']:<8}"
            f" {r['attempts']:>2}  {r['last_error'] or ''}".rstrip()
        )
    click.echo(f"\n{len(rows)} email(s), the newest first.")


@click.group("links", cls=DatabaseGroup)
def links_group() -> None:
    """Customers' recovery links."""


@links_group.command("revoke")
@click.argument("ref")
@click.option("--reason", default="operator", show_default=True, help="Written to the audit log.")
def links_revoke(ref: str, reason: str) -> None:
    """Revoke every live link of a case (id or in_…): they show the expired page.

    \b
    Example:
      recovery links revoke 42 --reason "customer asked us to stop"
    """
    with session_scope() as session:
        case = find_case(session, ref, lock=True)
        count = cases.revoke_links(session, case, clock.now(), operator(), reason)
    click.echo(json.dumps({"case": case.id, "revoked": count}))


COMMANDS = [emails_group, links_group]
