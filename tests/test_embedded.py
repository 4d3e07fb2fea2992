"""The README's first command: the embedded stack (SQLite, embedded broker), no servers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

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


def test_dev_check_recovers_through_our_link_a_saved_card_and_our_retry(tmp_path):
    from .conftest import free_port

    result = run_on_a_fresh_machine(
        tmp_path, "dev", "--check", "--port", str(free_port()), "--sim-port", str(free_port())
    )
    told = result.stdout
    assert "the customer opens the link in the payment_failed email and saves a new card" in told
    assert "check passed: the link, a saved card and our retry recovered the payment" in told
    # One card saved is several Stripe events, told once, with when its retry
    # comes: at once, since it is not the card that declined.
    assert told.count("the customer saved a new card") == 1, told
    assert "case 1: the customer saved a new card; its retry due now" in told
    assert "case 1: retry retry:card-update:" in told and "recovered $20.00" in told
    assert (tmp_path / "var" / "recovery.sqlite3").exists()
    # The customer was written to, in the file sink: the embedded default sends nothing.
    sent = [p.read_bytes() for p in (tmp_path / "var" / "outbox").glob("*.eml")]
    assert any(b"Subject: Our service: your payment did not go through" in m for m in sent)
    assert any(b"Subject: Our service: thank you, your payment went through" in m for m in sent)

    # A second run on the same database tells only its own story.
    again = run_on_a_fresh_machine(
        tmp_path, "dev", "--check", "--port", str(free_port()), "--sim-port", str(free_port())
    ).stdout
    story = [line.strip() for line in again.splitlines() if line.strip().startswith("·")]
    assert story and not any(line.startswith("· case 1:") for line in story), story
    first_events = {w for w in told.split() if w.startswith("(evt_")}
    assert not first_events & {w for w in again.split() if w.startswith("(evt_")}
    assert "· case 2: recovered $20.00" in story, story


def test_demo_needs_no_servers(tmp_path):
    """The README's first command, small, from a clean environment."""
    result = run_on_a_fresh_machine(tmp_path, "demo", "--size", "25", "--days", "10")
    assert "25 cases" in result.stdout and "FAIL" not in result.stdout
    assert (tmp_path / "var" / "demo" / "report.html").exists()


def test_dev_tells_the_story_as_it_happens_with_the_emails_link(tmp_path):
    from .conftest import free_port

    port = free_port()
    ran = run_on_a_fresh_machine(
        tmp_path, "dev", "--check", "--port", str(port), "--sim-port", str(free_port())
    )
    told = ran.stdout
    # The terminal tells the story; the processes' own logs are in their file.
    assert "their logs: var/dev.log" in told
    logged = (tmp_path / "var" / "dev.log").read_text()
    assert "celery@" in logged and "[recovery.access]" in logged
    for noise in ("celery@", "[recovery.access]", "[tasks]", "alembic"):
        assert noise not in told + ran.stderr, noise
    story = [line.strip() for line in told.splitlines() if line.strip().startswith("·")]
    assert story[0].startswith("· event received: invoice.payment_failed (evt_"), told
    expected = [
        "· case 1: opened for invoice in_",
        "· case 1: not enough money (funds): decline_code=insufficient_funds",
        f"· case 1: email payment_failed sent; its link: http://127.0.0.1:{port}/r/",
        "· case 1: recovered $20.00",
    ]
    positions = [next(i for i, line in enumerate(story) if line.startswith(e)) for e in expected]
    assert positions == sorted(positions), story


def test_dev_says_which_port_is_taken(tmp_path):
    import socket

    from .conftest import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "recovery", "dev", "--port", str(busy)],
            cwd=tmp_path,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert f"port {busy} is taken" in result.stderr and "--port" in result.stderr
        assert "Traceback" not in result.stderr
        sim_busy = subprocess.run(
            [
                sys.executable,
                "-m",
                "recovery",
                "dev",
                "--port",
                str(free_port()),
                "--sim-port",
                str(busy),
            ],
            cwd=tmp_path,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sim_busy.returncode == 2 and "--sim-port" in sim_busy.stderr


def test_the_stop_ends_what_a_process_of_the_stack_forked_and_left_behind():
    """A process of the stack forks one deaf to SIGTERM (as the worker forks
    its beat) and ends without stopping it: the stop ends that one too."""
    import signal

    from recovery.cli.dev import _spawn, _stop

    from .conftest import left_in_group

    leaves_one = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "left = os.fork()\n"
        "if left == 0:\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "print(left, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = _spawn(
        [sys.executable, "-c", leaves_one], dict(os.environ), {"stdout": subprocess.PIPE}
    )
    left = 0
    try:
        assert child.stdout is not None
        left = int(child.stdout.readline())
        assert os.getpgid(left) == child.pid
        _stop([child], grace=2)
        assert child.returncode == -signal.SIGTERM
        assert not left_in_group(child.pid, seconds=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.kill()
        child.wait()
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(left, signal.SIGKILL)
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.parametrize(
    "how",
    [
        "SIGINT to the terminal's group",
        "SIGINT to the terminal's group, again and again",
        "SIGTERM to recovery dev",
        "SIGHUP to recovery dev, its terminal closed",
    ],
)
def test_dev_stops_every_process_it_started(tmp_path, how):
    import signal
    import time

    from .conftest import free_port, groups_of_children, left_in_group, read_until

    port, sim_port = free_port(), free_port()
    said = (tmp_path / "stderr").open("w")
    dev = subprocess.Popen(
        [sys.executable, "-m", "recovery", "dev", "--port", str(port), "--sim-port", str(sim_port)],
        cwd=tmp_path,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=said,
        text=True,
        start_new_session=True,  # its own group, like a terminal's foreground job
    )
    groups = {dev.pid}
    try:
        assert dev.stdout is not None
        read_until(dev.stdout, "recovery is running", "recovery dev")
        # And the groups of the processes it started, which hold what those
        # fork in turn.
        groups |= groups_of_children(dev.pid)
        if how.endswith("again and again"):
            # An impatient person: the stop must neither break nor hang on
            # a Ctrl-C landing while the first is being handled, nor die of
            # one landing while the process exits.
            deadline = time.monotonic() + 45
            while dev.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(dev.pid, signal.SIGINT)
                time.sleep(0.03)
        elif how.startswith("SIGINT"):
            os.killpg(dev.pid, signal.SIGINT)
        elif how.startswith("SIGHUP"):
            dev.send_signal(signal.SIGHUP)
        else:
            dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=45) == 0, (tmp_path / "stderr").read_text()[-4000:]
        left = [process for group in groups for process in left_in_group(group)]
        assert not left, f"processes of recovery dev are still running: {left}"
    finally:
        # Whatever is left of its groups, so a failure leaves nothing running.
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        dev.wait()
        said.close()
        if dev.stdout is not None:
            dev.stdout.close()
