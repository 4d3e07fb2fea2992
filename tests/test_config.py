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
        ({"RETRY_LEARNING": "maybe"}, "RETRY_LEARNING='maybe' is not one of"),
        ({"BACKUP_CARDS": "yes"}, "BACKUP_CARDS='yes' is not one of"),
        ({"BACKUP_CARDS_EXCLUDE": "cus_ok1, jenny@example.com"}, "not Stripe customer ids"),
        ({"OUTBOUND_ALLOWED_NETWORKS": "10.0.0.0/33"}, "OUTBOUND_ALLOWED_NETWORKS must be IP"),
        ({"ALERT_URLS": "slack-webhook-token"}, "ALERT_URLS must be apprise URLs"),
        ({"ALERT_OVERDUE_MINUTES": "0"}, "ALERT_OVERDUE_MINUTES=0 is out of range"),
        ({"API_REQUESTS_PER_MINUTE": "fast"}, "API_REQUESTS_PER_MINUTE='fast' is not a whole"),
        ({"NOTICE_SECRET": "short"}, "NOTICE_SECRET must be 32 characters or more"),
        ({"EMBED_ALLOWED_ORIGINS": "app.example.com"}, "EMBED_ALLOWED_ORIGINS must be origins"),
        ({"EMBED_ALLOWED_ORIGINS": "https://a.example/path"}, "must be origins"),
        ({"TWILIO_API_BASE": "ftp://x"}, "TWILIO_API_BASE must be a URL"),
        ({"SMS_MAX_PER_CASE": "50"}, "SMS_MAX_PER_CASE=50 is out of range"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_backup_cards_exclude_takes_a_list_of_customers():
    settings = load_settings({"BACKUP_CARDS_EXCLUDE": " cus_A1 ,cus_B2,"})
    assert settings.backup_cards and settings.backup_cards_exclude == {"cus_A1", "cus_B2"}
    assert not load_settings({"BACKUP_CARDS": "off"}).backup_cards


# A production environment that passes every check; each case below spoils one value.
PRODUCTION = {
    "RECOVERY_ENV": "production",
    "STRIPE_API_KEY": "sk_live_51HqLyjWDarjtT1zdp7dcXW2kB3mN8qR4sT6vY9zA",
    "STRIPE_WEBHOOK_SECRET": "whsec_8Kq2mZpL4vXr7TnB1cYw9HsD3fGj6QaE",
    "SMTP_HOST": "smtp.postmark-relay.net",
    "PUBLIC_BASE_URL": "https://billing.acme-shop.io",
    "EMAIL_FROM": "Acme Billing <billing@acme-shop.io>",
    "BRAND_SUPPORT_EMAIL": "help@acme-shop.io",
}


def test_a_production_environment_with_real_values_starts():
    settings = load_settings(PRODUCTION)
    assert settings.stripe_livemode and settings.log_format == "json"


@pytest.mark.parametrize(
    ("spoiled", "variable"),
    [
        ({"STRIPE_API_KEY": ""}, "STRIPE_API_KEY is required"),
        ({"STRIPE_WEBHOOK_SECRET": ""}, "STRIPE_WEBHOOK_SECRET is required"),
        ({"STRIPE_API_KEY": "sk_live_"}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": "sk_live_replace_me"}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": "sk_test_recovery_development"}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": "sk_live_replaceMeWithYourOwnKeyPlease"}, "STRIPE_API_KEY"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_a"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_replace_me"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_recovery_development"}, "STRIPE_WEBHOOK_SECRET"),
        (
            {"STRIPE_WEBHOOK_SECRET": "whsec_8Kq2mZpL4vXr7TnB1cYw9HsD3fGj6QaE,whsec_a"},
            "STRIPE_WEBHOOK_SECRET",
        ),
        ({"SMTP_HOST": ""}, "SMTP_HOST is required"),
        ({"PUBLIC_BASE_URL": ""}, "PUBLIC_BASE_URL"),
        ({"PUBLIC_BASE_URL": "http://billing.acme-shop.io"}, "PUBLIC_BASE_URL"),
        ({"PUBLIC_BASE_URL": "https://billing.example.com"}, "PUBLIC_BASE_URL"),
        ({"PUBLIC_BASE_URL": "https://localhost:8000"}, "PUBLIC_BASE_URL"),
        ({"EMAIL_FROM": ""}, "EMAIL_FROM"),
        ({"BRAND_SUPPORT_EMAIL": "support@example.com"}, "BRAND_SUPPORT_EMAIL"),
    ],
)
def test_production_refuses_placeholders_development_defaults_and_malformed_values(
    spoiled, variable
):
    with pytest.raises(ConfigError, match=variable):
        load_settings({**PRODUCTION, **spoiled})


def test_the_env_example_as_shipped_does_not_start_in_production():
    shipped = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            shipped[name] = value
    shipped["RECOVERY_ENV"] = "production"
    with pytest.raises(ConfigError):
        load_settings(shipped)


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


def test_every_problem_of_a_run_is_told_at_once_each_on_its_line():
    with pytest.raises(ConfigError) as raised:
        load_settings(
            {
                "RECOVERY_ENV": "production",
                "LOG_LEVEL": "chatty",
                "SMTP_PORT": "many",
                "BRAND_ACCENT_COLOR": "teal",
                "DATABASE_URL": "mysql://db",
            }
        )
    named = [problem.split("=")[0].split(" ")[0] for problem in raised.value.problems]
    assert named == [
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "DATABASE_URL",
        "LOG_LEVEL",
        "SMTP_PORT",
        "BRAND_ACCENT_COLOR",
        "SMTP_HOST",
        "PUBLIC_BASE_URL",
        "EMAIL_FROM",
        "BRAND_SUPPORT_EMAIL",
    ]
    # A key refused as missing is not refused again as a placeholder.
    assert str(raised.value).count("STRIPE_API_KEY") == 1


def test_a_run_with_six_missing_settings_tells_all_six_in_one_message():
    result = run_cli("serve", RECOVERY_ENV="production", LOG_LEVEL="chatty")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"configuration errors ({len(lines) - 1}):", lines
    told = " ".join(lines)
    for variable in (
        "STRIPE_API_KEY is required",
        "STRIPE_WEBHOOK_SECRET is required",
        "LOG_LEVEL='chatty'",
        "SMTP_HOST is required",
        "PUBLIC_BASE_URL",
        "EMAIL_FROM",
        "BRAND_SUPPORT_EMAIL",
    ):
        assert told.count(variable) == 1, (variable, lines)
    assert len(lines) == 8, lines


def test_a_bad_plans_file_and_a_broken_templates_dir_are_told_together(tmp_path):
    import shutil

    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    (tmp_path / "templates" / "emails" / "final_notice" / "body.txt").unlink()
    (tmp_path / "plans.toml").write_text("[nonsense]\nmax_tries = 2")
    result = run_cli(
        "events",
        "list",
        TEMPLATES_DIR=str(tmp_path / "templates"),
        RECOVERY_PLANS_FILE=str(tmp_path / "plans.toml"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "configuration errors (2):", lines
    assert "RECOVERY_PLANS_FILE" in lines[1] and "TEMPLATES_DIR" in lines[2]


def test_production_process_refuses_to_start():
    result = run_cli("serve", RECOVERY_ENV="production")
    assert result.returncode == 2
    assert "STRIPE_API_KEY is required" in result.stderr and "Traceback" not in result.stderr


def test_production_with_the_development_secret_does_not_start():
    result = run_cli(
        "serve", **{**PRODUCTION, "STRIPE_WEBHOOK_SECRET": "whsec_recovery_development"}
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "STRIPE_WEBHOOK_SECRET" in result.stderr and "whsec_recovery" not in result.stderr


@pytest.mark.parametrize(
    ("plans", "message"),
    [
        ("[retry\nretry_days = [1", "RECOVERY_PLANS_FILE"),
        ('[retry]\nretry_days = ["soon"]', "RECOVERY_PLANS_FILE"),
        ('[retry]\nemails = [{template = "payment_failed"}]', "RECOVERY_PLANS_FILE"),
        ('[retry]\nemails = [{day = 1, template = "hello"}]', "emails that do not exist: hello"),
        ("[nonsense]\nmax_tries = 2", "unknown plan"),
    ],
)
def test_a_bad_plans_file_stops_every_process_at_start(tmp_path, plans, message):
    path = tmp_path / "plans.toml"
    path.write_text(plans)
    result = run_cli("events", "list", RECOVERY_PLANS_FILE=str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("configuration error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_templates_dir_missing_a_template_stops_every_process_at_start(tmp_path):
    import shutil

    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    (tmp_path / "templates" / "emails" / "final_notice" / "body.txt").unlink()
    result = run_cli("events", "list", TEMPLATES_DIR=str(tmp_path / "templates"))
    assert result.returncode == 2
    assert "TEMPLATES_DIR" in result.stderr and "final_notice/body.txt" in result.stderr


def _docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it
    decides; a pattern is anchored at the context's root, ** spans folders."""
    import re

    def matches(pattern: str, candidate: str) -> bool:
        regex = ""
        for part in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
            regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        parts = candidate.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))

    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if matches(pattern.lstrip("!"), path):
            ignored = not negated
    return ignored


def test_the_image_never_holds_a_local_env_and_has_what_it_builds_from():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for secret in (".env", ".env.production", ".git/config", "var/recovery.sqlite3"):
        assert _docker_ignores(secret, patterns), secret
    needed = ["pyproject.toml", "setup.py", "README.md", "constraints.txt"]
    needed += ["celerybeat-schedule.py", "recovery/web.py", "recovery/sim/fixtures.json"]
    needed += ["migrations/env.py", "templates/emails/_base.html", ".env.example"]
    for path in needed:
        assert (ROOT / path).exists() and not _docker_ignores(path, patterns), path
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile and " -e " not in dockerfile


def test_the_preflight_knows_every_email_and_page_the_code_renders():
    from recovery import preflight
    from recovery.customers.emails import NAMES
    from recovery.web import PAGES

    assert preflight.email_names() == sorted(NAMES)
    shipped = set(preflight.shipped_templates())
    wanted = {f"pages/{page}.html" for page in PAGES} | {"report/report.html"}
    wanted |= {f"emails/{n}/{part}" for n in NAMES for part in ("subject.txt", "body.txt")}
    assert wanted <= shipped, wanted - shipped
