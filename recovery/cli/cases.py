"""Operator commands that read: how a decline is classified, the cases and
their timelines (the commands that act on cases are in actions.py)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import click
from sqlalchemy import select

from recovery.cli.common import (
    DatabaseGroup,
    amount,
    emit_json,
    find_case,
    first,
    instant_option,
)
from recovery.db import session_scope
from recovery.engine import classify as rules
from recovery.models import (
    AuditEntry,
    CaseStatus,
    Message,
    RecoveryAttempt,
    RecoveryCase,
    RecoveryLink,
    StepStatus,
)

# -- classify ---------------------------------------------------------------------


@click.command()
@click.option("--list", "show_list", is_flag=True, help="Print the whole rule table.")
@click.option("--decline-code")
@click.option("--advice-code")
@click.option("--network-advice-code")
@click.option("--network-decline-code")
@click.option("--brand")
@click.option("--json", "as_json", is_flag=True)
def classify(
    show_list: bool,
    decline_code: str | None,
    advice_code: str | None,
    network_advice_code: str | None,
    network_decline_code: str | None,
    brand: str | None,
    as_json: bool,
) -> None:
    """How a decline is read: the rule table, or one failure's category.

    \b
    Examples:
      recovery classify --list
      recovery classify --decline-code do_not_honor --brand mastercard --network-advice-code 03
    """
    if show_list:
        table = rules.table()
        if as_json:
            return emit_json(table)
        click.echo(f"{'signal':<32} {'code':<34} {'category':<16} {'wait':<5} why")
        for row in table:
            click.echo(
                f"{row['signal']:<32} {row['code']:<34} {row['category']:<16} "
                f"{row['min_wait']:<5} {row['why']}"
            )
        return
    if not any((decline_code, advice_code, network_advice_code, network_decline_code)):
        raise click.UsageError("pass --list, or the codes of one failure")
    result = rules.classify(
        rules.Failure(
            decline_code=decline_code,
            advice_code=advice_code,
            network_advice_code=network_advice_code,
            network_decline_code=network_decline_code,
            card_brand=brand,
        )
    )
    answer = {
        "category": result.category.value,
        "why": result.why,
        "decided_by": result.source,
        "min_wait_hours": result.min_wait / timedelta(hours=1),
        "may_retry_card": result.may_retry_card,
        "contacts_customer": result.contacts_customer,
    }
    if as_json:
        return emit_json(answer)
    answer["category"] = rules.described(result.category)
    for key, value in answer.items():
        click.echo(f"{key:>18}: {value}")


# -- cases ------------------------------------------------------------------------


@click.group(cls=DatabaseGroup)
def cases() -> None:
    """Recovery cases: one per failed invoice."""


def _case_summary(case: RecoveryCase) -> dict[str, Any]:
    return {
        "id": case.id,
        "invoice": case.invoice_id,
        "status": case.status,
        "category": case.category,
        "mode": case.mode,
        "amount_due": case.amount_due,
        "currency": case.currency,
        "decline_code": case.decline_code,
        "opened_at": case.opened_at,
        "paused": case.paused_at is not None,
        "flag": case.flag_reason,
    }


@cases.command("list")
@click.option("--status", type=click.Choice([s.value for s in CaseStatus]))
@click.option("--category")
@click.option("--since", help="Opened at or after this ISO 8601 instant.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
def cases_list(
    status: str | None, category: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """The newest cases first.

    \b
    Examples:
      recovery cases list --status open --category retry
      recovery cases list --since 2026-11-01 --json
    """
    query = select(RecoveryCase).order_by(RecoveryCase.id.desc()).limit(limit + 1)
    if status:
        query = query.where(RecoveryCase.status == status)
    if category:
        query = query.where(RecoveryCase.category == category)
    if since:
        query = query.where(RecoveryCase.opened_at >= instant_option(since, "--since"))
    with session_scope() as session:
        rows = first([_case_summary(c) for c in session.scalars(query)], limit)
    if as_json:
        return emit_json(rows)
    click.echo(
        f"{'id':>6}  {'status':<13} {'category':<16} {'amount':>12}  {'decline':<24} invoice"
    )
    for r in rows:
        due = amount(r["amount_due"], r["currency"])
        flags = (" paused" if r["paused"] else "") + (" FLAGGED" if r["flag"] else "")
        click.echo(
            f"{r['id']:>6}  {r['status']:<13} {r['category'] or '-':<16} {due:>12}  "
            f"{r['decline_code'] or '-':<24} {r['invoice']}{flags}"
        )
    shown = sorted({r["category"] for r in rows if r["category"]})
    legend = "; ".join(rules.described(c) for c in shown)
    click.echo(f"\n{len(rows)} case(s)" + (f"; categories: {legend}." if legend else "."))


@cases.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def cases_show(ref: str, as_json: bool) -> None:
    """One case and its timeline. REF is the case id or the invoice id.

    \b
    Example:
      recovery cases show in_1MtHbELkdIwHu7ixl4OzzPMv
    """
    with session_scope() as session:
        case = find_case(session, ref)
        summary = _case_summary(case) | {
            "card_brand": case.card_brand,
            "failure_code": case.failure_code,
            "advice_code": case.advice_code,
            "network_advice_code": case.network_advice_code,
            "network_decline_code": case.network_decline_code,
            "stripe_attempt_count": case.attempt_count,
            "first_failed_at": case.first_failed_at,
            "closed_at": case.closed_at,
            "amount_recovered": case.amount_recovered,
        }
        timeline = []
        for entry in session.scalars(
            select(AuditEntry).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id)
        ):
            timeline.append(
                {
                    "at": entry.created_at,
                    "what": entry.action,
                    "by": entry.actor,
                    "detail": entry.detail,
                }
            )
        planned = []
        for step in session.scalars(
            select(RecoveryAttempt)
            .where(RecoveryAttempt.case_id == case.id)
            .order_by(RecoveryAttempt.due_at)
        ):
            planned.append(
                {
                    "step": step.step,
                    "status": step.status,
                    "due_at": step.due_at,
                    "outcome": step.outcome,
                    "decline_code": step.decline_code,
                    "executed_at": step.executed_at,
                    "tries": step.tries,
                    "why": step.why,
                    "slot": step.slot,
                }
            )
        messages = [
            {
                "step": m.step,
                "template": m.template,
                "status": m.status,
                "attempts": m.attempts,
                "sent_at": m.sent_at,
                "last_error": m.last_error,
            }
            for m in session.scalars(
                select(Message).where(Message.case_id == case.id).order_by(Message.id)
            )
        ]
        links = [
            {
                "purpose": link.purpose,
                "expires_at": link.expires_at,
                "revoked": link.revoked_at is not None,
                "clicks": link.click_count,
            }
            for link in session.scalars(select(RecoveryLink).where(RecoveryLink.case_id == case.id))
        ]
        upcoming = [s for s in planned if s["status"] is StepStatus.SCHEDULED]
        data = {
            **summary,
            "timeline": timeline,
            "steps": planned,
            "emails": messages,
            "links": links,
            "next_step": upcoming[0] if upcoming else None,
        }
    if as_json:
        return emit_json(data)
    money = {"amount_due", "amount_recovered"}
    written = {
        key: amount(value, case.currency) if key in money and value is not None else value
        for key, value in summary.items()
        if key != "currency"
    }
    written["category"] = rules.described(case.category) if case.category else None
    for key, value in written.items():
        click.echo(f"{key:>22}: {value if value is not None else '-'}")
    click.echo("\ntimeline:")
    for item in timeline:
        click.echo(
            f"  {item['at']:%Y-%m-%d %H:%M}  {item['what']:<22} {item['by']:<20} "
            f"{json.dumps(item['detail'], default=str)}"
        )
    click.echo("\nsteps:")
    for s in planned:
        click.echo(
            f"  {s['due_at']:%Y-%m-%d %H:%M}  {s['step']:<34} {s['status']:<10} "
            f"{s['outcome'] or ''} {s['decline_code'] or ''}"
        )
    click.echo("\nemails:")
    for m in messages:
        when = f"{m['sent_at']:%Y-%m-%d %H:%M}" if m["sent_at"] else " " * 16
        click.echo(
            f"  {when}  {m['template']:<24} {m['status']:<8} {m['last_error'] or ''}".rstrip()
        )
    nxt = data["next_step"]
    if nxt is None:
        click.echo("\nnext step: none")
    else:
        click.echo(f"\nnext step: {nxt['step']} at {nxt['due_at']:%Y-%m-%d %H:%M} UTC")
        if nxt["why"]:
            click.echo(f"       why: {nxt['why']}")


COMMANDS = [classify, cases]
