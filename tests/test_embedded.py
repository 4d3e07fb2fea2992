"""The README's first command: the embedded stack (SQLite, embedded broker), no servers."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT


def clean_environment() -> dict[str, str]:
    """A fresh machine's environment: none of the settings the tests use."""
    prefixes = ("STRIPE_", "DATABASE_", "BROKER_", "RECOVERY_", "LOG_", "OUTBOX_", "SMTP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_on_a_fresh_machine(cwd, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "recovery", *args],
        cwd=cwd,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_dev_check_follows_a_payment_to_recovery(tmp_path):
    from .conftest import free_port

    result = run_on_a_fresh_machine(
        tmp_path, "dev", "--check", "--port", str(free_port()), "--sim-port", str(free_port())
    )
    assert "decline insufficient_funds" in result.stdout
    assert "recovered: $20.00" in result.stdout
    assert (tmp_path / "var" / "recovery.sqlite3").exists()
    # The customer was written to, in the file sink: the embedded default sends nothing.
    sent = [p.read_bytes() for p in (tmp_path / "var" / "outbox").glob("*.eml")]
    assert any(b"Subject: Your Our service payment did not go through" in m for m in sent)


def test_demo_needs_no_servers(tmp_path):
    """The README's first command, small, from a clean environment."""
    result = run_on_a_fresh_machine(tmp_path, "demo", "--size", "25", "--days", "10")
    assert "25 cases" in result.stdout and "FAIL" not in result.stdout
    assert (tmp_path / "var" / "demo" / "report.html").exists()
