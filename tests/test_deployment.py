"""The deployment as docs/getting-started.md writes it: .env.example copied to .env, read
by docker-compose.yml the way Compose reads it, gives settings that start and
send email where the compose file's Mailpit listens; the worker's and beat's
healthchecks pass while they run and fail when they do not."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from recovery.config import ConfigError, load_settings

from .conftest import ROOT
from .test_worker_e2e import start_worker, stop, wait_for, worker_env

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# What the guide's step 3 asks to fill in.
README_FILLS = {
    "STRIPE_API_KEY": "sk_test_51Hx4e2Lq8ZpT7nB3cYw9HsD3fGj6QaE",
    "STRIPE_WEBHOOK_SECRET": "whsec_8Kq2mZpL4vXr7TnB1cYw9HsD3fGj6QaE",
}


def dotenv(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            found[name.strip()] = value
    return found


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} (empty counts as unset) and $$."""

    def one(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        given = variables.get(name, "")
        return given if given or default is None else default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", one, value.replace("$$", "\0")).replace("\0", "$")


def container_environment(service: str, dotenv_file: dict[str, str]) -> dict[str, str]:
    """env_file: .env, then the service's environment: (interpolated from .env)."""
    spec = COMPOSE["services"][service]
    assert spec["env_file"] == ".env"
    environment = dict(dotenv_file)
    for name, value in spec["environment"].items():
        environment[name] = interpolate(str(value), dotenv_file)
    return environment


def shipped_env(**changes: str) -> dict[str, str]:
    return {**dotenv((ROOT / ".env.example").read_text()), **README_FILLS, **changes}


@pytest.mark.parametrize("service", ["web", "worker", "beat"])
def test_the_env_example_as_the_readme_fills_it_starts_and_mails_to_mailpit(service):
    settings = load_settings(container_environment(service, shipped_env()))
    assert settings.env == "development"
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_security) == (
        "mailpit",
        1025,  # Mailpit's SMTP port; it speaks no TLS unless configured to
        "none",
    )
    assert settings.public_base_url == "http://localhost:8000"
    assert settings.database_url.startswith("postgresql://recovery:recovery@postgres:5432/")
    assert settings.broker_url == "redis://redis:6379/0"
    mailpit = COMPOSE["services"]["mailpit"]
    assert mailpit["image"] == "axllent/mailpit"
    assert not any("MP_SMTP" in str(v) for v in mailpit.get("environment", {}) or {})
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    assert "http://localhost:8025" in guide and "Mailpit" in guide


def test_a_real_smtp_server_in_env_reaches_the_workers():
    env = shipped_env(SMTP_HOST="smtp.acme-mail.io", SMTP_PORT="465", SMTP_SECURITY="tls")
    settings = load_settings(container_environment("worker", env))
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_security) == (
        "smtp.acme-mail.io",
        465,
        "tls",
    )


def test_switched_to_production_the_env_example_refuses_to_start_until_filled():
    with pytest.raises(ConfigError):
        load_settings(container_environment("worker", shipped_env(RECOVERY_ENV="production")))


def healthcheck(service: str, env: dict[str, str], cwd) -> int:
    kind, *command = COMPOSE["services"][service]["healthcheck"]["test"]
    if kind == "CMD-SHELL":
        argv = ["sh", "-c", interpolate(command[0], {})]
    else:
        assert kind == "CMD"
        argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=60).returncode


def test_the_workers_healthcheck_passes_while_it_runs_and_fails_without_it(
    db, flushed_redis, tmp_path
):
    # Celery names the worker celery@<host name>; Docker sets HOSTNAME to it.
    env = {
        **worker_env(db, flushed_redis, "http://127.0.0.1:9"),
        "HOSTNAME": socket.gethostname(),
    }
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"
    worker = start_worker(db, flushed_redis, "http://127.0.0.1:9", tmp_path)
    try:
        # Up when Celery's own ping (a short wait) finds it; then the check passes.
        quick_ping = [sys.executable, "-m", "celery", "-A", "recovery", "inspect", "ping"]
        quick_ping += ["--timeout", "1"]
        wait_for(lambda: subprocess.run(quick_ping, env=env, capture_output=True).returncode == 0)
        assert healthcheck("worker", env, tmp_path) == 0
    finally:
        stop(worker)
    assert healthcheck("worker", env, tmp_path) != 0


def test_beats_healthcheck_passes_while_it_runs_and_fails_when_its_state_is_stale(
    db, flushed_redis, tmp_path
):
    env = worker_env(db, flushed_redis, "http://127.0.0.1:9")
    assert healthcheck("beat", env, tmp_path) != 0
    beat = subprocess.Popen(
        [sys.executable, "-m", "recovery", "beat"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: healthcheck("beat", env, tmp_path) == 0, 60)
        ten_minutes_ago = time.time() - 600
        for state in (tmp_path / "var").glob("celerybeat-state*"):
            os.utime(state, (ten_minutes_ago, ten_minutes_ago))
        assert healthcheck("beat", env, tmp_path) != 0
    finally:
        errors = stop(beat)
    assert "Traceback" not in errors, errors[-3000:]
