"""What a new user trips on at the command line, run as they would run it: the
README's exit codes (1 user error, 2 usage, 3 a service unavailable), one
line instead of a traceback, money written one way, lists that say when they
stopped at their limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, free_port


def recovery(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STRIPE_", "DATABASE_", "BROKER_", "RECOVERY_", "SMTP_", "OUTBOX"))
    }
    return subprocess.run(
        [sys.executable, "-m", "recovery", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo's run, in the default place under a fresh directory."""
    home = tmp_path_factory.mktemp("home")
    made = recovery(home, "demo", "--size", "12", "--days", "6", "--no-compare")
    assert made.returncode == 0, made.stderr
    return home


def test_reading_commands_without_a_database_say_where_the_demos_data_is(tmp_path, demo_dir):
    for command in (["stats"], ["cases", "list"], ["events", "list"], ["plans", "explain"]):
        result = recovery(tmp_path, *command)
        assert result.returncode == 3, result
        assert "no database at var/recovery.sqlite3 (DATABASE_URL is not set)" in result.stderr
        assert "recovery db upgrade" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "var").exists()  # not created empty by a read

    after_demo = recovery(demo_dir, "stats")
    assert after_demo.returncode == 3
    assert "export DATABASE_URL=sqlite:///var/demo/recovery.sqlite3" in after_demo.stderr
    assert not (demo_dir / "var" / "recovery.sqlite3").exists()
    told = recovery(demo_dir, "stats", DATABASE_URL="sqlite:///var/demo/recovery.sqlite3")
    assert told.returncode == 0 and "cases" in told.stdout


def test_every_command_of_a_database_group_gives_its_help_without_one(tmp_path, monkeypatch):
    """A new user reads `recovery cases list --help` before making any
    database; the commands themselves still refuse to run without one."""
    from click.testing import CliRunner

    from recovery.cli import cli
    from recovery.cli.common import DatabaseGroup
    from recovery.config import get_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        named = {n: cli.get_command(None, n) for n in cli.list_commands(None)}
        groups = {n: g for n, g in named.items() if isinstance(g, DatabaseGroup)}
        assert {"cases", "events", "plans", "links"} <= set(groups)
        for name, group in groups.items():
            for sub in group.commands:
                shown = CliRunner().invoke(cli, [name, sub, "--help"])
                assert shown.exit_code == 0, (name, sub, shown.output)
                assert f"Usage: cli {name} {sub}" in shown.output
        listed = CliRunner().invoke(cli, ["cases", "list"])
        assert listed.exit_code == 3 and "no database at var/recovery.sqlite3" in listed.output
        assert not (tmp_path / "var").exists()
    finally:
        get_settings.cache_clear()


def test_send_test_event_with_the_simulator_down_is_one_line_and_exit_3(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    result = recovery(tmp_path, "send-test-event", "--sim-url", down)
    assert result.returncode == 3
    line = one_line(result)
    assert f"the Stripe simulator at {down} is not answering" in line and "recovery dev" in line


def test_a_mail_server_that_is_down_is_exit_3_and_an_unwritable_report_exit_2(tmp_path):
    smtp_down = recovery(
        tmp_path,
        "emails",
        "send-test",
        "payment_failed",
        "--to",
        "ops@acme-shop.io",
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(free_port()),
        SMTP_SECURITY="none",
    )
    assert smtp_down.returncode == 3 and "mail server is unavailable" in one_line(smtp_down)

    database = tmp_path / "r.sqlite3"
    assert recovery(tmp_path, "db", "upgrade", DATABASE_URL=f"sqlite:///{database}").returncode == 0
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    report = recovery(
        tmp_path, "report", "--out", str(blocked / "r.html"), DATABASE_URL=f"sqlite:///{database}"
    )
    assert report.returncode == 2 and "Traceback" not in report.stderr
    assert "--out" in report.stderr and "cannot write" in report.stderr


def test_lists_say_when_they_stop_at_their_limit_and_money_is_written_one_way(demo_dir):
    env = {"DATABASE_URL": "sqlite:///var/demo/recovery.sqlite3"}
    every = json.loads(recovery(demo_dir, "cases", "list", "--json", **env).stdout)
    assert len(every) >= 3

    cut = recovery(demo_dir, "cases", "list", "--limit", "2", **env)
    assert cut.returncode == 0
    # The header, two cases, and the closing sentence after a blank line.
    assert len(cut.stdout.strip().splitlines()) == 5
    assert cut.stdout.strip().splitlines()[-1].startswith("2 case(s); categories: ")
    assert "showing the first 2; more match" in cut.stderr
    whole = recovery(demo_dir, "cases", "list", "--limit", str(len(every)), **env)
    assert "showing the first" not in whole.stderr
    assert len(whole.stdout.strip().splitlines()) == len(every) + 3
    for command in (["events", "list", "--limit", "1"], ["emails", "list", "--limit", "1"]):
        assert "showing the first 1; more match" in recovery(demo_dir, *command, **env).stderr

    case = every[0]
    symbol = {"usd": "$", "eur": "€"}[case["currency"]]
    written = f"{symbol}{case['amount_due'] / 100:,.2f}"
    assert written in whole.stdout
    shown = recovery(demo_dir, "cases", "show", str(case["id"]), **env).stdout
    assert f"amount_due: {written}" in shown
    stats = recovery(demo_dir, "stats", **env).stdout
    assert " usd" not in stats and " eur" not in stats


def test_a_retry_stripe_does_not_answer_is_exit_3_and_stays_due(demo_dir):
    env = {
        "DATABASE_URL": "sqlite:///var/demo/recovery.sqlite3",
        "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}",
    }
    open_cases = json.loads(
        recovery(demo_dir, "cases", "list", "--status", "open", "--json", **env).stdout
    )
    assert open_cases
    result = recovery(
        demo_dir, "retry", str(open_cases[0]["id"]), "--force", "--reason", "on the phone", **env
    )
    assert result.returncode == 3, result
    assert "Stripe did not answer; the retry stays due" in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_say_what_they_did_in_a_sentence_without_library_chatter(tmp_path, demo_dir):
    fresh = {"DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}"}
    upgraded = recovery(tmp_path, "db", "upgrade", **fresh)
    assert upgraded.returncode == 0 and upgraded.stderr == "", upgraded.stderr
    assert upgraded.stdout.startswith("The database is upgraded from migration none to ")
    again = recovery(tmp_path, "db", "upgrade", **fresh).stdout
    assert again.startswith("The database was already at migration ") and again.endswith(".\n")

    env = {"DATABASE_URL": "sqlite:///var/demo/recovery.sqlite3"}
    out = tmp_path / "r.html"
    cases = len(json.loads(recovery(demo_dir, "cases", "list", "--json", **env).stdout))
    written = recovery(demo_dir, "report", "--out", str(out), **env)
    assert written.stdout == f"Wrote the report of {cases} cases to {out}.\n", written.stdout
    as_json = json.loads(recovery(demo_dir, "report", "--out", str(out), "--json", **env).stdout)
    assert as_json == {"report": str(out), "cases": cases}
    # Categories are told in words beside their codes.
    stats = recovery(demo_dir, "stats", **env).stdout
    assert "(funds)" in stats and "not enough money" in stats
    assert stats.strip().endswith("gives every figure.")
    for command in (
        ["status"],
        ["stats"],
        ["cases", "list"],
        ["events", "list"],
        ["emails", "list"],
        ["plans", "explain"],
    ):
        last = recovery(demo_dir, *command, **env).stdout.strip().splitlines()[-1]
        assert last[0].isupper() or last[0].isdigit(), (command, last)
        assert last.endswith("."), (command, last)
