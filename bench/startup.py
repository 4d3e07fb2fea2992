"""How long a person (or a script calling `recovery tick` every hour) waits
for a command to answer.

    python bench/startup.py [--runs 7]

A small demo's SQLite database is made in a temporary directory; then each
command runs `--runs` times as a new process, as a shell runs it, and the
median and slowest wall times are printed beside the target: 0.3 s for
`--version` and `--help`, 0.6 s for a command that reads the database.
`python -X importtime -m recovery COMMAND` shows where a slow one's time goes.

The package is compiled to bytecode first, as pip does for a wheel and as
Python does on a first import unless PYTHONDONTWRITEBYTECODE is set (it is
on some machines, which then compile every module on every run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS: list[tuple[list[str], float]] = [
    (["--version"], 0.3),
    (["--help"], 0.3),
    (["stats", "--help"], 0.6),
    (["stats"], 0.6),
    (["status"], 0.6),
    (["cases", "list"], 0.6),
    (["cases", "show", "1"], 0.6),
    (["events", "list"], 0.6),
]


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    exe = [str(Path(sys.executable).with_name("recovery"))]
    if not Path(exe[0]).exists():
        exe = [sys.executable, "-m", "recovery"]
    import recovery

    package = Path(recovery.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    with tempfile.TemporaryDirectory() as home:
        cwd = Path(home)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "STRIPE_"))}
        subprocess.run(
            [*exe, "demo", "--size", "30", "--days", "10", "--no-compare"],
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
        )
        env["DATABASE_URL"] = "sqlite:///var/demo/recovery.sqlite3"
        print(f"{'command':<24}{'median':>9}{'slowest':>9}{'target':>9}")
        for args, target in COMMANDS:
            times = [timed([*exe, *args], cwd, env) for _ in range(runs)]
            median = statistics.median(times)
            mark = "ok" if median <= target else "SLOW"
            print(f"{' '.join(args):<24}{median:>8.2f}s{max(times):>8.2f}s{target:>8.1f}s  {mark}")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
