"""What every command group shares: JSON output, the operator's name,
instants and cases named on the command line, and the database they read."""

from __future__ import annotations

import functools
import getpass
import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import clock
from recovery.config import get_settings
from recovery.db import sqlite_file
from recovery.models import RecoveryCase
from recovery.money import format_money

# Operators' amounts are written one way, whatever the customer's locale.
CLI_LOCALE = "en_US"
# Where `recovery demo` writes its run unless told otherwise.
DEMO_DIR = Path("var/demo")


class Unavailable(click.ClickException):
    """A service the command needs (the database, Stripe) is not there: exit 3."""

    exit_code = 3


Command = TypeVar("Command", bound=Callable[..., Any])


def needs_database(command: Command) -> Command:
    """For commands that read or change cases: an embedded database that does
    not exist is reported (and where the demo's data is), not created empty
    by a read and then found to hold no tables."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        path = sqlite_file(get_settings().database_url)
        if path is not None and not path.exists():
            demo = DEMO_DIR / "recovery.sqlite3"
            hint = (
                f"; the demo's data is in {demo}:\n  export DATABASE_URL=sqlite:///{demo}"
                if demo.exists()
                else "; `recovery db upgrade` makes it, `recovery demo` fills one with a run"
            )
            named = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "DATABASE_URL is not set"
            raise Unavailable(f"no database at {path} ({named}){hint}")
        return command(*args, **kwargs)

    return checked  # type: ignore[return-value]


class DatabaseGroup(click.Group):
    """A group whose every command needs the database. The check goes on
    the commands, not the group's own callback: that runs before a
    command's --help is read, and help needs no database."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if cmd.callback is not None:
            cmd.callback = needs_database(cmd.callback)
        super().add_command(cmd, name)


def amount(minor: int, currency: str) -> str:
    """How every command writes money: $99.00, €12.50, ¥500 (JSON keeps the
    integer minor units and the currency)."""
    return format_money(minor, currency, CLI_LOCALE)


def first(rows: list[Any], limit: int) -> list[Any]:
    """The first `limit` of `rows` (fetched with one more than the limit),
    saying on stderr when more matched, so a list is never taken for all."""
    if len(rows) > limit:
        click.echo(
            f"showing the first {limit}; more match (raise --limit or narrow the filters)",
            err=True,
        )
    return rows[:limit]


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def operator() -> str:
    """Who is acting, for the audit log: the operating-system user."""
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator:unknown"


def instant_option(value: str, option: str) -> datetime:
    """An ISO 8601 instant given on the command line, or a usage error naming the option."""
    try:
        return clock.parse_instant(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 instant", param_hint=option
        ) from None


def optional_instant(value: str | None, option: str) -> datetime | None:
    return instant_option(value, option) if value is not None else None


def find_case(session: Session, ref: str, lock: bool = False) -> RecoveryCase:
    """The case a command names (its id or invoice id), or a clear error;
    `lock` holds its row for a command that acts on it."""
    query = select(RecoveryCase).where(
        RecoveryCase.id == int(ref) if ref.isdigit() else RecoveryCase.invoice_id == ref
    )
    case = session.scalars(query.with_for_update() if lock else query).one_or_none()
    if case is None:
        raise click.ClickException(f"no case {ref!r} (give a case id or an invoice id, in_…)")
    return case
