"""What every command group shares: JSON output, the operator's name, and
instants and cases named on the command line."""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import Any

import click
from sqlalchemy.orm import Session

from recovery import clock
from recovery.engine import cases
from recovery.models import RecoveryCase


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
    """The case a command names (its id or invoice id), or a clear error."""
    case = cases.by_ref(session, ref, lock=lock)
    if case is None:
        raise click.ClickException(f"no case {ref!r} (give a case id or an invoice id, in_…)")
    return case
