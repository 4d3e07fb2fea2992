"""Operator commands for the money: what recovery brought back, as a table or a page."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from recovery import clock
from recovery import report as page
from recovery import stats as figures
from recovery.cli.common import emit_json, needs_database, optional_instant
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine.classify import described
from recovery.money import format_totals


def print_summary(stats: dict[str, Any]) -> None:
    """The numbers an operator looks for first, as a table."""
    recovered, cases = stats["recovered"], stats["cases"]
    click.echo(
        f"\n{cases['total']} cases · {recovered['count']} recovered "
        f"({recovered['rate'] * 100:.1f}%) · {format_totals(recovered['amount'])} "
        f"of {format_totals(stats['at_stake'])} at stake"
    )
    click.echo(
        f"still open {cases['open']} · canceled {cases['canceled']} · voided {cases['voided']}"
        f" · uncollectible {cases['uncollectible']}"
    )
    click.echo(
        f"{stats['retries']['made']} retries made · {stats['funnel']['emails_sent']} emails "
        f"sent · {stats['funnel']['clicked']} cases clicked a link"
    )
    uncharged = stats["retries"]["steps_that_charged_nothing"]
    if uncharged:
        click.echo(f"retry steps that charged nothing: {_counts(uncharged)}")
    took = stats["time_to_recover_hours"]
    median, most = page.days(took["median"]), page.days(took["p90"])
    click.echo(f"time to recover: median {median}, 90% within {most}")
    named = {row["name"]: described(row["name"]) for row in stats["by_cause"]}
    width = max([26, *(len(name) + 2 for name in named.values())])
    click.echo(
        f"\n{'category (why it failed)':<{width}}{'cases':>7}{'recovered':>11}{'rate':>8}  amount"
    )
    for row in stats["by_cause"]:
        click.echo(
            f"{named[row['name']]:<{width}}{row['cases']:>7}{row['recovered']:>11}"
            f"{row['rate'] * 100:>7.1f}%  {format_totals(row['amount'])}"
        )
    click.echo(f"\n{'channel':<10}{'sent':>7}{'reached':>9}{'clicked':>9}{'recovered':>11}")
    for row in stats["by_channel"]:
        click.echo(
            f"{row['name']:<10}{row['sent']:>7}{row['reached']:>9}{row['clicked']:>9}"
            f"{row['recovered_after_click']:>11}"
        )
    click.echo(f"\n{'how it was recovered':<26}{'cases':>7}  amount")
    for row in stats["by_path"]:
        name, amount = row["name"].replace("_", " "), format_totals(row["amount"])
        click.echo(f"{name:<26}{row['recovered']:>7}  {amount}")
    click.echo(
        "\nA retry is a charge that reached Stripe; `recovery stats --json` gives every figure."
    )


def write_report(
    stats: dict[str, Any],
    out: Path,
    title: str,
    headline: str | None = None,
    checks: dict[str, bool] | None = None,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    html = page.render(stats, get_settings(), title, datetime.now(UTC), headline, checks)
    out.write_text(html, encoding="utf-8")


@click.command()
@click.option("--since", help="Only cases opened since this date (ISO 8601).")
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON.")
@needs_database
def stats(since: str | None, as_json: bool) -> None:
    """Recovery rate and revenue, by cause, decline code, path and step.

    \b
    Examples:
      recovery stats
      recovery stats --since 2026-11-01 --json
    """
    with session_scope() as session:
        numbers = figures.compute(session, optional_instant(since, "--since"))
    if as_json:
        return emit_json(numbers)
    print_summary(numbers)


@click.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--since", help="Only cases opened since this date (ISO 8601).")
@click.option("--title", default="Payment recovery", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Say what was written, as JSON.")
@needs_database
def report(out: Path, since: str | None, title: str, as_json: bool) -> None:
    """Write one self-contained HTML page with charts.

    \b
    Example:
      recovery report --out report.html
      recovery report --out report.html --since 2026-11-01 --json
    """
    with session_scope() as session:
        numbers = figures.compute(session, optional_instant(since, "--since"))
    try:
        write_report(numbers, out, title)
    except OSError as unwritable:
        raise click.BadParameter(
            f"cannot write {out}: {unwritable.strerror or unwritable}", param_hint="--out"
        ) from None
    if as_json:
        return emit_json({"report": str(out), "cases": numbers["cases"]["total"]})
    click.echo(f"Wrote the report of {numbers['cases']['total']} cases to {out}.")


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{name.replace('_', ' ')} {count:,}" for name, count in counts.items() if count]
    return " · ".join(shown) or "none"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The same, as JSON.")
@needs_database
def status(as_json: bool) -> None:
    """What the installation is doing now: the figures /metrics gives Prometheus.

    \b
    Example:
      recovery status
    """
    from recovery import metrics  # Prometheus's client: only this command needs it

    with session_scope() as session:
        state = metrics.snapshot(session, clock.now())
    if as_json:
        return emit_json(dataclasses.asdict(state))
    overdue = sum(state.steps_overdue.values())
    waiting = state.events.get("pending", 0) + state.events.get("processing", 0)
    lines = [
        ("events", f"{_counts(state.events)}"),
        (
            "inbox",
            f"{waiting:,} waiting, the oldest for {state.oldest_waiting_event_seconds:,.0f} s"
            if waiting
            else "nothing waiting",
        ),
        ("steps due", _counts(state.steps_due)),
        (
            "overdue",
            f"{overdue:,} due for over {metrics.OVERDUE_AFTER.seconds // 60} min:"
            " are the workers running?"
            if overdue
            else "none",
        ),
        ("retries", f"{sum(state.retries.values()):,} charges: {_counts(state.retries)}"),
        ("no charge", _counts(state.retry_steps_charged_nothing)),
        ("emails", _counts(state.emails)),
        ("cases", _counts(state.cases)),
        ("recovered", format_totals(state.recovered)),
    ]
    click.echo(f"as of {state.at:%Y-%m-%d %H:%M:%S} UTC")
    for name, text in lines:
        click.echo(f"{name:>10}  {text}")
    click.echo(
        "\nA retry is a charge that reached Stripe; `recovery status --json` gives every figure."
    )


COMMANDS = [stats, report, status]
