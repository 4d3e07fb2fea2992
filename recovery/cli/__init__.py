"""The `recovery` command: one module per command group, each parsing its
arguments, calling the product and printing what it did."""

from __future__ import annotations

import importlib
import sys

import click

from recovery import __version__, preflight
from recovery.config import ConfigError, explain, get_settings

# Each command's module under recovery.cli, imported only when the command
# runs: `--version` and `--help` would otherwise wait over a second on the
# web app, the simulator and the email renderer that they never use.
COMMAND_MODULES = {
    **dict.fromkeys(("db", "serve", "worker", "beat"), "run"),
    **dict.fromkeys(("stripe-sim", "dev", "send-test-event", "demo", "simulate"), "dev"),
    **dict.fromkeys(("classify", "cases"), "cases"),
    **dict.fromkeys(("tick", "retry", "pause", "resume", "cancel"), "actions"),
    **dict.fromkeys(("events", "sync"), "inbox"),
    **dict.fromkeys(("emails", "links"), "customers"),
    **dict.fromkeys(("stats", "report", "status"), "figures"),
    "plans": "plans",
    **dict.fromkeys(("endpoints", "alerts", "api-keys"), "business"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when named."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if module is None:
            return None
        commands = importlib.import_module(f"recovery.cli.{module}").COMMANDS
        return next(command for command in commands if command.name == cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The names only: each one's help would import every command.
        with formatter.section("Commands (recovery COMMAND --help for each)"):
            formatter.write_text(" · ".join(self.list_commands(ctx)))


@click.group(cls=LazyGroup)
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
      recovery endpoints add | list | test | deliveries | replay
                                         signed webhooks to the business's systems
      recovery alerts test | list        operators' alerts (ALERT_URLS)
      recovery api-keys create | list | revoke
                                         keys for the status API the business's app reads
      recovery sync                      backfill failed invoices at install
      recovery events replay --since     catch up after downtime
      recovery simulate                  backtest plans side by side
      recovery tick --now ISO --sync     one pass as of an instant
    \b
    Configuration is the environment (see .env.example and
    docs/configuration.md); bad values stop every command, each named on a
    line of its own.
    \b
    Exit codes: 0 ok · 1 user error (unknown id, refused action) ·
    2 usage (bad arguments or configuration) · 3 a service is unavailable
    (database, Stripe).
    """
    # Validate the whole configuration before any command does anything, and
    # log through the one configuration (LOG_FORMAT, the scrubber, Sentry);
    # imported here, so that `--version` and `--help` need not load it.
    from recovery.observability import configure

    settings = get_settings()
    preflight.check(settings)
    configure(settings)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(explain(exc), err=True)
        sys.exit(2)
    except Exception as exc:
        # A database error can only come once SQLAlchemy is loaded.
        database = sys.modules.get("sqlalchemy.exc")
        if database is None or not isinstance(exc, database.DBAPIError):
            raise
        # The driver's first line only: the statement and the URL stay out.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        click.echo(
            f"database unavailable: {reason} (is it running, and migrated with"
            " `recovery db upgrade`?)",
            err=True,
        )
        sys.exit(3)
