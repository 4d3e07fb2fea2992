"""The `recovery` command: one module per command group, each parsing its
arguments, calling the product and printing what it did."""

from __future__ import annotations

import sys

import click
from sqlalchemy.exc import DBAPIError

from recovery import __version__, preflight
from recovery.cli import cases, customers, dev, figures, inbox, plans, run
from recovery.config import ConfigError, explain, get_settings
from recovery.observability import configure


@click.group()
@click.version_option(__version__, prog_name="recovery")
def cli() -> None:
    """Win back failed Stripe subscription payments.

    \b
    Start here:
      recovery demo                      a month of failures, worked on this machine
      recovery dev                       the whole stack, live, on the embedded default
    \b
    Run it (docker-compose runs these):
      recovery db upgrade                apply migrations
      recovery serve                     webhook receiver and customer links
      recovery worker                    Celery worker (events, steps, emails)
      recovery beat                      the scheduler, exactly one
    \b
    Operate it:
      recovery cases list | show         cases and their timelines
      recovery plans explain             the plans, and what retries have taught
      recovery retry | pause | resume | cancel
      recovery stats | report            what recovery brought back
      recovery status                    backlog, due steps, outcomes, now (as /metrics)
      recovery emails preview | send-test | list
      recovery links revoke
      recovery sync                      backfill failed invoices at install
      recovery events replay --since     catch up after downtime
      recovery simulate                  backtest plans side by side
      recovery tick --now ISO --sync     one pass as of an instant
    \b
    Configuration is the environment (see .env.example); a bad value stops
    every command with one line naming it.
    \b
    Exit codes: 0 ok · 1 user error (unknown id, refused action) ·
    2 usage (bad arguments or configuration) · 3 a service is unavailable
    (database, Stripe).
    """
    # Validate the whole configuration before any command does anything, and
    # log through the one configuration (LOG_FORMAT, the scrubber, Sentry).
    settings = get_settings()
    preflight.check(settings)
    configure(settings)


for _group in (run, dev, cases, inbox, customers, figures, plans):
    for _command in _group.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(explain(exc), err=True)
        sys.exit(2)
    except DBAPIError as exc:
        # The driver's first line only: the statement and the URL stay out.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        click.echo(
            f"database unavailable: {reason} (is it running, and migrated with"
            " `recovery db upgrade`?)",
            err=True,
        )
        sys.exit(3)
