"""The wheel carries everything the product reads at run time: built from this
checkout, installed (not editable) in a fresh virtual environment, its
commands run from an empty directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from .conftest import ROOT


def run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        tmp_path,
    )
    wheel = next(tmp_path.glob("recovery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in (
        "recovery/_shipped/migrations/env.py",
        "recovery/_shipped/templates/emails/payment_failed/subject.txt",
        "recovery/_shipped/celerybeat-schedule.py",
        "recovery/sim/fixtures.json",
        "recovery/sim/policies/stripe_recommended.toml",
    ):
        assert shipped in names, shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names

    # The wheel alone goes into the new environment; its dependencies are
    # this one's, seen through a .pth (which does not run this environment's
    # own .pth files, so the checkout's editable install stays out of sight).
    # Installing them afresh took most of this test's minute.
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    own = run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path)
    Path(own.strip(), "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    run([*pip, "install", "-q", "--no-deps", str(wheel)], tmp_path)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STRIPE_", "DATABASE_", "BROKER_", "RECOVERY_", "PYTHON"))
    }
    recovery = [str(python), "-m", "recovery"]
    from recovery import __version__

    assert run([*recovery, "--version"], empty, env).strip() == f"recovery, version {__version__}"
    assert (
        run([str(environment / "bin" / "recovery"), "--version"], empty, env)
        .strip()
        .endswith(__version__)
    )
    assert "upgraded from migration none to" in run([*recovery, "db", "upgrade"], empty, env)
    preview = run([*recovery, "emails", "preview", "payment_failed"], empty, env)
    assert "Subject:" in preview or "subject" in preview.lower()
    demo = run([*recovery, "demo", "--size", "6", "--days", "3"], empty, env)
    assert "no card-network retry rule broken" in demo and "Stripe" in demo, demo
    located = run(
        [str(python), "-c", "import recovery.tasks, recovery; print(recovery.__file__)"],
        empty,
        env,
    )
    assert str(environment) in located  # the installed copy, not this checkout
