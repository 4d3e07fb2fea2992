"""The operator's `recovery` command on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from click.testing import CliRunner

from recovery.cli import cli
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import scheduler
from recovery.models import WebhookEvent

from .factories import post_event, stripe_event


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def all_commands() -> dict:
    from recovery.cli import cli

    return {name: cli.get_command(None, name) for name in cli.list_commands(None)}


def test_every_command_is_registered_by_its_name_and_module():
    import importlib

    from recovery.cli import COMMAND_MODULES

    found = all_commands()
    assert all(command.name == name for name, command in found.items())
    for module in set(COMMAND_MODULES.values()):
        named = {c.name for c in importlib.import_module(f"recovery.cli.{module}").COMMANDS}
        assert named == {n for n, m in COMMAND_MODULES.items() if m == module}, module


def test_help_lists_the_commands():
    result = run("--help")
    words = result.output.replace("·", " ").split()
    for command in ("db", "serve", "worker", "beat", "events", "stripe-sim", "dev"):
        assert command in words
    events_help = run("events", "--help").output
    assert all(f"  {c} " in events_help for c in ("list", "show", "replay"))


def test_list_show_and_replay(receiver):
    paid = stripe_event("invoice.paid", {"id": "in_x", "object": "invoice"})
    plan = stripe_event("plan.created", {"id": "plan_x", "object": "plan"})
    post_event(receiver, paid)
    post_event(receiver, plan)
    listed = run("events", "list", "--type", "plan.created")
    assert listed.exit_code == 0
    assert plan["id"] in listed.output and paid["id"] not in listed.output
    assert paid["id"] in run("events", "list", "--status", "pending").output

    shown = run("events", "show", paid["id"])
    assert shown.exit_code == 0 and "invoice.paid" in shown.output and "in_x" in shown.output
    with session_scope() as session:
        row = session.query(WebhookEvent).filter_by(stripe_event_id=plan["id"]).one()
        row.status, row.last_error = "failed", "StripeUnavailable: down"
    assert "StripeUnavailable: down" in run("events", "show", str(row.id)).output

    replayed = run("events", "replay", "--failed")
    assert replayed.exit_code == 0 and "1 event(s) queued again" in replayed.output
    assert (
        scheduler.process_events([row.id], datetime.now(UTC), get_settings())[row.id] == "ignored"
    )


def test_unknown_ids_are_a_clear_error(receiver):
    for args in (
        ("events", "show", "evt_nope"),
        ("events", "show", "999"),
        ("events", "replay", "evt_nope"),
    ):
        result = run(*args)
        assert result.exit_code == 1
        assert "no event" in result.output and "Traceback" not in result.output
    assert run("events", "replay").exit_code == 2


def test_help_reads_like_a_manual_with_examples_everywhere():
    from click.testing import CliRunner

    from recovery.cli import cli

    top = CliRunner().invoke(cli, ["--help"]).output
    assert "Exit codes: 0 ok" in top and "3 a service is unavailable" in top

    def leaves(command, path=()):
        subcommands = getattr(command, "commands", None)
        if not subcommands:
            yield path, command
            return
        for name, sub in subcommands.items():
            yield from leaves(sub, (*path, name))

    missing = [
        " ".join(path)
        for name, top_command in all_commands().items()
        for path, command in leaves(top_command, (name,))
        if "Example" not in (command.help or "")
    ]
    assert missing == []


# What each command must not load: the reason `--version` once took 1.9 s
# and `stats` 2.5 s (bench/startup.py measures the time itself).
UNUSED_BY = {
    ("--version",): ("sqlalchemy", "jinja2", "stripe", "celery", "recovery.web"),
    ("--help",): ("sqlalchemy", "jinja2", "stripe", "celery", "recovery.web"),
    ("stats", "--json"): ("jinja2", "stripe", "celery", "alembic", "sentry_sdk", "recovery.sim"),
    ("cases", "list"): ("jinja2", "stripe", "celery", "alembic", "recovery.web", "recovery.sim"),
}


def test_commands_load_only_what_they_use(tmp_path):
    import json
    import os
    import subprocess
    import sys

    probe = (
        "import json, sys\n"
        "from recovery.cli import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:], prog_name='recovery')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "STRIPE_"))}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'empty.db'}"
    subprocess.run([sys.executable, "-m", "recovery", "db", "upgrade"], env=env, check=True)
    for argv, unused in UNUSED_BY.items():
        done = subprocess.run(
            [sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True
        )
        loaded = set(json.loads(done.stderr.strip().splitlines()[-1]))
        assert done.stdout, argv
        wrong = {m for m in loaded for u in unused if m == u or m.startswith(u + ".")}
        assert not wrong, (argv, sorted(wrong)[:5])
