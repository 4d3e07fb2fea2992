"""Operator commands for the money: the demo, stats, the report, the backtest."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from recovery import clock
from recovery.cli_cases import _emit_json, instant_option
from recovery.config import get_settings


def _since(value: str | None) -> datetime | None:
    return instant_option(value, "--since") if value is not None else None


def _money(totals: dict[str, int]) -> str:
    from recovery.report import money

    return money(totals)


def print_summary(stats: dict) -> None:
    """The numbers an operator looks for first, as a table."""
    recovered = stats["recovered"]
    click.echo(
        f"\n{stats['cases']['total']} cases · {recovered['count']} recovered "
        f"({recovered['rate'] * 100:.1f}%) · {_money(recovered['amount'])} "
        f"of {_money(stats['at_stake'])} at stake"
    )
    click.echo(
        f"{stats['retries']['made']} retries made · {stats['funnel']['emails_sent']} emails "
        f"sent · {stats['funnel']['clicked']} cases clicked a link · median time to recover "
        f"{stats['time_to_recover_hours']['median'] or '-'} h"
    )
    click.echo(f"\n{'cause':<26}{'cases':>7}{'recovered':>11}{'rate':>8}  amount")
    for row in stats["by_cause"]:
        click.echo(
            f"{row['name']:<26}{row['cases']:>7}{row['recovered']:>11}"
            f"{row['rate'] * 100:>7.1f}%  {_money(row['amount'])}"
        )
    click.echo(f"\n{'how it was recovered':<26}{'cases':>7}  amount")
    for row in stats["by_path"]:
        click.echo(
            f"{row['name'].replace('_', ' '):<26}{row['recovered']:>7}  {_money(row['amount'])}"
        )


def write_report(stats: dict, out: Path, title: str) -> None:
    from recovery import report

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(stats, get_settings(), title, datetime.now(UTC)), encoding="utf-8")


@click.command()
@click.option("--size", default=300, show_default=True, help="Subscribers whose renewal fails.")
@click.option("--days", default=30, show_default=True, help="Simulated days.")
@click.option("--seed", default=1, show_default=True, help="Same seed, same month.")
@click.option(
    "--dir",
    "workdir",
    default="var/demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the run's database, emails and report go (emptied first).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON instead.")
def demo(size: int, days: int, seed: int, workdir: Path, as_json: bool) -> None:
    """Run a month of failed renewals through the real product, on this machine.

    No servers: SQLite, the bundled Stripe-compatible server and a file email
    sink, all in this process. Renewals fail with a mix of causes and arrive
    as signed webhooks over HTTP; the engine retries and emails on a
    simulated clock; simulated customers open emails, click links and update
    cards. Ends with a summary, consistency checks and an HTML report.

    \b
    Examples:
      recovery demo
      recovery demo --size 500 --seed 7 --dir /tmp/demo
      recovery demo --json | jq .recovered
    """
    from recovery import demo as running
    from recovery import population

    if size < 1 or days < 1:
        raise click.BadParameter("--size and --days must be at least 1")
    members = population.synthetic(size, seed, running.START)
    hours = days * 24 + 1
    with click.progressbar(
        length=hours,
        label=f"Simulating {days} days, {size} subscribers",
        file=sys.stderr,
    ) as bar:
        outcome = running.run(members, seed, days, workdir.resolve(), progress=bar.update)
    report_path = workdir / "report.html"
    write_report(outcome.stats, report_path, f"Recovery demo: {size} subscribers, seed {seed}")
    if as_json:
        _emit_json({"stats": outcome.stats, "checks": outcome.checks})
    else:
        print_summary(outcome.stats)
        click.echo(
            f"\ncustomers opened {outcome.emails_opened} emails, clicked {outcome.links_clicked}"
            f" links, saved {outcome.cards_saved} new cards, authenticated {outcome.authenticated}"
        )
        click.echo("\nchecks:")
        for name, ok in outcome.checks.items():
            mark = click.style("ok  ", fg="green") if ok else click.style("FAIL", fg="red")
            click.echo(f"  {mark} {name}")
        database = workdir / "recovery.sqlite3"
        click.echo(f"\nreport: {report_path}")
        click.echo(f"database: {database}")
        click.echo(f"  look around: DATABASE_URL=sqlite:///{database} recovery cases list")
    if not all(outcome.checks.values()):
        raise SystemExit(1)


@click.command()
@click.option("--since", help="Only cases opened since this date (ISO 8601).")
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON.")
def stats(since: str | None, as_json: bool) -> None:
    """Recovery rate and revenue, by cause, decline code, path and step.

    \b
    Examples:
      recovery stats
      recovery stats --since 2026-11-01 --json
    """
    from recovery import stats as figures
    from recovery.db import session_scope

    with session_scope() as session:
        numbers = figures.compute(session, _since(since))
    if as_json:
        return _emit_json(numbers)
    print_summary(numbers)


@click.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--since", help="Only cases opened since this date (ISO 8601).")
@click.option("--title", default="Payment recovery", show_default=True)
def report(out: Path, since: str | None, title: str) -> None:
    """Write one self-contained HTML page with charts.

    \b
    Example:
      recovery report --out report.html
    """
    from recovery import stats as figures
    from recovery.db import session_scope

    with session_scope() as session:
        numbers = figures.compute(session, _since(since))
    write_report(numbers, out, title)
    click.echo(json.dumps({"report": str(out), "cases": numbers["cases"]["total"]}))


@click.command()
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1, 100))
@click.option("--restart", is_flag=True, help="Start from the newest invoice again.")
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
    from recovery import backfill, stripe_api

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
    click.echo(
        f"{last.seen} open invoice(s) seen, {last.queued} failure(s) queued;"
        " the workers open the cases (or run `recovery tick --sync`)"
    )


@click.command()
@click.option(
    "--plans",
    "plan_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A plans file (TOML) to compare; repeat for more. The defaults always run.",
)
@click.option("--size", default=300, show_default=True, help="Synthetic subscribers.")
@click.option("--days", default=45, show_default=True, help="Simulated days per run.")
@click.option("--seed", default=1, show_default=True)
@click.option("--from-db", is_flag=True, help="Shape the population on the stored cases.")
@click.option(
    "--dir",
    "workdir",
    default="var/simulate",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--json", "as_json", is_flag=True)
def simulate(plan_files, size, days, seed, from_db, workdir, as_json) -> None:
    """Backtest plans: recovered revenue side by side, same customers, same clock.

    Every plan runs through the real engine on the simulated clock against an
    identical population (same seed), so the plan is the only difference.
    The population and customer behaviour are assumptions, stated in
    recovery/population.py; --from-db takes causes, amounts and currencies
    from your stored cases instead.

    \b
    Examples:
      recovery simulate --plans fewer-retries.toml
      recovery simulate --plans a.toml --plans b.toml --size 500 --seed 3 --json
    """
    from recovery import backtest, demo, population

    if from_db:
        try:
            members = backtest.population_from_cases(seed, size)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        members = population.synthetic(size, seed, demo.START)
    plans = {"default": None, **{Path(f).stem: str(Path(f).resolve()) for f in plan_files}}
    with click.progressbar(
        length=len(plans) * (days * 24 + 1),
        label=f"{len(plans)} plan(s) x {days} days, {len(members)} subscribers",
        file=sys.stderr,
    ) as bar:
        results = backtest.run(plans, members, seed, days, workdir.resolve(), bar.update)
    if as_json:
        return _emit_json(results)
    names = list(results)
    rows = [
        ("recovered", lambda s: f"{s['recovered']['count']} ({s['recovered']['rate'] * 100:.1f}%)"),
        ("revenue recovered", lambda s: _money(s["recovered"]["amount"])),
        ("retries made", lambda s: str(s["retries"]["made"])),
        ("emails sent", lambda s: str(s["funnel"]["emails_sent"])),
        ("median hours to recover", lambda s: str(s["time_to_recover_hours"]["median"] or "-")),
        *[
            (f"  {path.replace('_', ' ')}", _path_column(path))
            for path in ("retry", "card_update", "link", "paid_elsewhere")
        ],
    ]
    width = max(24, *(len(n) + 2 for n in names))
    click.echo(f"\n{'':<26}" + "".join(f"{n:>{width}}" for n in names))
    for label, cell in rows:
        click.echo(f"{label:<26}" + "".join(f"{cell(results[n]['stats']):>{width}}" for n in names))
    failed = [n for n in names if not all(results[n]["checks"].values())]
    if failed:
        click.echo(f"\nconsistency checks FAILED for: {', '.join(failed)}", err=True)
        raise SystemExit(1)
    click.echo(
        "\nAssumptions: see recovery/population.py (causes, when cards work again, how customers"
        " answer). Compare plans with one another, not with your real recovery rate."
    )


def _path_column(path: str):
    def cell(s: dict) -> str:
        row = next(r for r in s["by_path"] if r["name"] == path)
        return f"{row['recovered']}"

    return cell


COMMANDS = [demo, stats, report, sync, simulate]
