"""Settings: defaults, validation, production's refusal to run without secrets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recovery.config import ConfigError, load_settings

from .conftest import ROOT


def test_development_defaults_need_no_servers():
    settings = load_settings({})
    assert settings.database_url == "sqlite:///var/recovery.sqlite3"
    assert settings.broker_url.startswith("sqla+sqlite:///var/")
    assert (settings.env, settings.log_format, settings.stripe_livemode) == (
        "development",
        "console",
        False,
    )
    assert settings.stripe_api_version == "2026-10-28.endive"


def test_several_webhook_secrets_for_rotation():
    settings = load_settings({"STRIPE_WEBHOOK_SECRET": "whsec_new, whsec_old"})
    assert settings.stripe_webhook_secrets == ("whsec_new", "whsec_old")
    assert "whsec" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RECOVERY_ENV": "staging"}, "RECOVERY_ENV='staging' is not one of"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml' is not one of"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud' is not one of"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL must be a URL"),
        ({"BROKER_URL": "kafka://x"}, "BROKER_URL must be a URL"),
        ({"STRIPE_API_BASE": "ftp://x"}, "STRIPE_API_BASE must be a URL"),
        ({"STRIPE_API_KEY": "pk_test_123"}, "STRIPE_API_KEY must be a secret"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_a,secret"}, "STRIPE_WEBHOOK_SECRET must hold"),
        ({"EVENT_MAX_ATTEMPTS": "many"}, "EVENT_MAX_ATTEMPTS='many' is not a whole number"),
        ({"EVENT_MAX_ATTEMPTS": "0"}, "EVENT_MAX_ATTEMPTS=0 is out of range"),
        ({"SMTP_SECURITY": "ssl3"}, "SMTP_SECURITY='ssl3' is not one of"),
        ({"SMTP_PORT": "70000"}, "SMTP_PORT=70000 is out of range"),
        ({"EMAIL_FROM": "Billing <billing>"}, "EMAIL_FROM must be an email address"),
        ({"EMAIL_FROM": "a@b.c, d@e.f"}, "EMAIL_FROM must be an email address"),
        ({"BRAND_SUPPORT_EMAIL": "help"}, "BRAND_SUPPORT_EMAIL must be an email address"),
        ({"BRAND_ACCENT_COLOR": "purple"}, "BRAND_ACCENT_COLOR='purple' is not a hex colour"),
        ({"BRAND_LOGO_URL": "javascript:alert(1)"}, "BRAND_LOGO_URL must be a URL"),
        ({"LINK_TTL_DAYS": "365"}, "LINK_TTL_DAYS=365 is out of range"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_production_refuses_to_start_without_secrets():
    with pytest.raises(ConfigError, match="STRIPE_API_KEY is required"):
        load_settings({"RECOVERY_ENV": "production"})
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRET is required"):
        load_settings({"RECOVERY_ENV": "production", "STRIPE_API_KEY": "sk_live_abc"})
    settings = load_settings(
        {
            "RECOVERY_ENV": "production",
            "STRIPE_API_KEY": "sk_live_abc",
            "STRIPE_WEBHOOK_SECRET": "whsec_abc",
        }
    )
    assert settings.stripe_livemode and settings.log_format == "json"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STRIPE_", "DATABASE_", "BROKER_", "RECOVERY_", "LOG_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "recovery", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_value_is_one_line_without_traceback():
    result = run_cli("events", "list", LOG_LEVEL="chatty")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: LOG_LEVEL='chatty' is not one of: "
        "DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


def test_production_process_refuses_to_start():
    result = run_cli("serve", RECOVERY_ENV="production")
    assert result.returncode == 2
    assert "STRIPE_API_KEY is required" in result.stderr and "Traceback" not in result.stderr
