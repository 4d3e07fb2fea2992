"""Settings from the environment, read and validated once per process.

Every bad value of a run is reported at once: ConfigError holds one line per
problem, each naming its variable; the CLI, the ASGI entry point and the
worker print them all (`explain`) and exit, without a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from recovery.paths import shipped

T = TypeVar("T")

# The Stripe API version this code is written against; pinned so a change on
# the account's default version cannot change the shapes we parse.
DEFAULT_STRIPE_API_VERSION = "2026-10-28.endive"

# Development-only credentials: they let the embedded stack run without a
# Stripe account. Production refuses to start without real ones.
DEV_STRIPE_API_KEY = "sk_test_recovery_development"
# Visa's rule: at most 15 reattempts of a declined card in 30 days (20 for
# categories 2-4 from April 2026; plans.py has the sources). The setting's
# default, and the one home of the number.
VISA_MAX_ATTEMPTS_30D = 15
DEV_WEBHOOK_SECRET = "whsec_recovery_development"  # noqa: S105 - development only

# The emails, the customer pages and the report, beside the package.
DEFAULT_TEMPLATES_DIR = shipped("templates")

ENVIRONMENTS = ("development", "production")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RECOVERY_MODES = ("auto", "assist", "take_over")
SMTP_SECURITY = ("none", "starttls", "tls")


class ConfigError(Exception):
    """Environment variables with values we cannot use: one line each."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def explain(error: ConfigError) -> str:
    """What a person reads: every problem, each on its line."""
    if len(error.problems) == 1:
        return f"configuration error: {error.problems[0]}"
    lines = "".join(f"\n  {problem}" for problem in error.problems)
    return f"configuration errors ({len(error.problems)}):{lines}"


class _Env:
    """The environment being read, and the problems found in it so far: a
    reader notes a bad value, goes on with the default, and the whole list
    is raised at the end."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[str] = []

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    def refuse(self, problem: str, fallback: T) -> T:
        self.problems.append(problem)
        return fallback


@dataclass(frozen=True)
class Settings:
    env: str
    database_url: str
    broker_url: str
    stripe_api_key: str
    stripe_webhook_secrets: tuple[str, ...] = field(repr=False)
    stripe_api_base: str | None
    stripe_api_version: str
    public_base_url: str
    sentry_dsn: str | None = field(repr=False)
    log_format: str
    log_level: str
    webhook_tolerance_seconds: int
    event_max_attempts: int
    relay_batch_size: int
    database_statement_timeout_ms: int = 30_000
    # The engine (see engine/).
    recovery_mode: str = "auto"
    plans_file: str | None = None
    stripe_write_rate: float = 20.0
    stripe_read_rate: float = 20.0
    visa_max_attempts_30d: int = VISA_MAX_ATTEMPTS_30D
    # Time plan retries by what has paid before (engine/learner.py). Off by
    # default: on the simulated population it recovers under a point more
    # than the plans with fewer retries, but half a day later on average
    # (docs/simulation.md, "Does it recover more than Stripe?").
    retry_learning: bool = False
    # Once the plan's tries on the card are spent (or the card cannot be
    # retried), try another unexpired card saved on the customer, except for
    # the customers listed.
    backup_cards: bool = True
    backup_cards_exclude: frozenset[str] = frozenset()
    step_lease_seconds: int = 300
    dispatch_batch_size: int = 500
    card_update_min_gap_seconds: int = 300
    # The customer side (see customers/).
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_security: str = "starttls"
    email_from: str = "Billing <billing@example.com>"
    outbox_dir: str = "var/outbox"
    brand_name: str = "Our service"
    brand_support_email: str = "support@example.com"
    brand_logo_url: str | None = None
    brand_accent_color: str = "#635bff"
    link_ttl_days: int = 14
    link_clicks_per_minute: int = 30
    # Proxies in front of the web app whose X-Forwarded-For is believed: the
    # click limit keys on the first address before them.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    # Bearer token /metrics asks for; None: open (keep it off the internet).
    metrics_token: str | None = None
    templates_dir: Path = DEFAULT_TEMPLATES_DIR
    # Telling the business (see business/). Networks its webhook endpoints
    # may reach though private (an internal receiver); none by default.
    outbound_allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    # apprise URLs operators are alerted through; none: alerts are only logged.
    alert_urls: tuple[str, ...] = field(default=(), repr=False)
    alert_overdue_minutes: int = 15
    # The business's app (docs/app.md): the status API's rate per key, the
    # notice's signing secret (none: no notice) and who may frame it.
    api_requests_per_minute: int = 600
    notice_secret: str | None = field(default=None, repr=False)
    embed_allowed_origins: tuple[str, ...] = ()
    # SMS (customers/texting.py): Twilio when an account is set, else .txt
    # files in SMS_DIR. Only to customers whose Stripe metadata holds consent.
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_from: str | None = None
    twilio_api_base: str | None = None
    sms_dir: str = "var/sms"
    sms_consent_metadata_key: str = "sms_consent"
    sms_max_per_case: int = 2

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def stripe_livemode(self) -> bool:
        """Whether the configured key acts on live data (events must match)."""
        return "_live_" in self.stripe_api_key


def _choice(env: _Env, name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").strip() or default
    normalised = value.upper() if choices is LOG_LEVELS else value.lower()
    if normalised not in choices:
        return env.refuse(f"{name}={value!r} is not one of: {', '.join(choices)}", default)
    return normalised


def _customer_ids(env: _Env, name: str) -> frozenset[str]:
    ids = frozenset(part.strip() for part in env.get(name, "").split(",") if part.strip())
    wrong = sorted(i for i in ids if not re.fullmatch(r"cus_[A-Za-z0-9]{1,250}", i))
    if wrong:
        problem = f"{name}: not Stripe customer ids (cus_...): {', '.join(wrong)}"
        return env.refuse(problem, frozenset())
    return ids


def _int(env: _Env, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        return env.refuse(f"{name}={raw!r} is not a whole number", default)
    if not minimum <= value <= maximum:
        return env.refuse(f"{name}={value} is out of range ({minimum}..{maximum})", default)
    return value


def plausible_address(address: str) -> bool:
    """One @ with text on both sides, no spaces, commas or line breaks: nothing
    that could name a second recipient or start a header."""
    local, _, domain = address.partition("@")
    return (
        bool(local and domain)
        and "@" not in domain
        and "," not in address
        and address.isprintable()
        and not any(c.isspace() for c in address)
    )


def _email(env: _Env, name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    address = value.rsplit("<", 1)[-1].rstrip(">").strip()
    if not plausible_address(address):
        problem = f"{name} must be an email address (optionally 'Name <address>')"
        return env.refuse(problem, default)
    return value


def _colour(env: _Env, name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    digits = value.removeprefix("#")
    if len(digits) not in (3, 6) or any(c not in "0123456789abcdefABCDEF" for c in digits):
        return env.refuse(f"{name}={value!r} is not a hex colour such as #635bff", default)
    return "#" + digits.lower()


def _directory(env: _Env, name: str, default: Path) -> Path:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        return env.refuse(f"{name}={raw!r} is not a directory", default)
    return path


def _url(env: _Env, name: str, default: str | None, schemes: tuple[str, ...]):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    parts = urlsplit(raw)
    scheme = parts.scheme.split("+")[0]
    if scheme not in schemes or (scheme != "memory" and not (parts.netloc or parts.path)):
        problem = f"{name} must be a URL starting with one of: {', '.join(schemes)}"
        return env.refuse(problem, default)
    return raw.rstrip("/") if scheme in ("http", "https") else raw


def _networks(env: _Env, name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    found = []
    for part in env.get(name, "").split(","):
        if part.strip():
            try:
                found.append(ip_network(part.strip(), strict=False))
            except ValueError:
                env.refuse(
                    f"{name} must be IP addresses or networks, comma-separated "
                    f"(e.g. 10.0.0.0/8,127.0.0.1); got {part.strip()[:40]!r}",
                    None,
                )
    return tuple(found)


def _notice_secret(env: _Env, name: str) -> str | None:
    secret = env.get(name, "").strip()
    if secret and len(secret) < 32:
        return env.refuse(f"{name} must be 32 characters or more (e.g. openssl rand -hex 32)", None)
    return secret or None


def _origins(env: _Env, name: str) -> tuple[str, ...]:
    origins = tuple(
        part.strip().rstrip("/") for part in env.get(name, "").split(",") if part.strip()
    )
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.path:
            return env.refuse(
                f"{name} must be origins such as https://app.example.com, comma-separated;"
                f" got {origin[:60]!r}",
                (),
            )
    return origins


def _alert_urls(env: _Env, name: str) -> tuple[str, ...]:
    # Apprise URLs hold tokens: a bad one is named by its scheme alone.
    urls = tuple(part.strip() for part in env.get(name, "").replace(",", " ").split())
    bad = [url for url in urls if "://" not in url]
    if bad:
        return env.refuse(
            f"{name} must be apprise URLs (slack://…, mailto://…, json://…), space- or"
            f" comma-separated; {len(bad)} has no scheme://",
            (),
        )
    return urls


def load_settings(values: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from a mapping (the process environment by default).
    Raises ConfigError with every problem found, not only the first."""
    env = _Env(os.environ if values is None else values)
    environment = _choice(env, "RECOVERY_ENV", ENVIRONMENTS, "development")
    production = environment == "production"

    api_key = env.get("STRIPE_API_KEY", "").strip()
    if not api_key:
        if production:
            env.refuse("STRIPE_API_KEY is required when RECOVERY_ENV=production", None)
        api_key = DEV_STRIPE_API_KEY
    elif not api_key.startswith(("sk_test_", "sk_live_", "rk_test_", "rk_live_")):
        env.refuse("STRIPE_API_KEY must be a secret or restricted key (sk_… or rk_…)", None)
        api_key = DEV_STRIPE_API_KEY

    secrets_raw = env.get("STRIPE_WEBHOOK_SECRET", "").strip()
    secrets = tuple(s.strip() for s in secrets_raw.split(",") if s.strip())
    if not secrets:
        if production:
            env.refuse("STRIPE_WEBHOOK_SECRET is required when RECOVERY_ENV=production", None)
        secrets = (DEV_WEBHOOK_SECRET,)
    if any(not s.startswith("whsec_") for s in secrets):
        env.refuse("STRIPE_WEBHOOK_SECRET must hold whsec_… values, comma-separated", None)
        secrets = (DEV_WEBHOOK_SECRET,)

    settings = Settings(
        env=environment,
        database_url=_url(
            env, "DATABASE_URL", "sqlite:///var/recovery.sqlite3", ("sqlite", "postgresql")
        ),
        broker_url=_url(
            env,
            "BROKER_URL",
            "sqla+sqlite:///var/broker.sqlite3",
            ("redis", "rediss", "amqp", "sqla", "memory"),
        ),
        stripe_api_key=api_key,
        stripe_webhook_secrets=secrets,
        stripe_api_base=_url(env, "STRIPE_API_BASE", None, ("http", "https")),
        stripe_api_version=env.get("STRIPE_API_VERSION", "").strip() or DEFAULT_STRIPE_API_VERSION,
        public_base_url=_url(env, "PUBLIC_BASE_URL", "http://127.0.0.1:8000", ("http", "https")),
        sentry_dsn=_url(env, "SENTRY_DSN", None, ("http", "https")),
        log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS, "json" if production else "console"),
        log_level=_choice(env, "LOG_LEVEL", LOG_LEVELS, "INFO"),
        webhook_tolerance_seconds=_int(env, "WEBHOOK_TOLERANCE_SECONDS", 300, 1, 3600),
        event_max_attempts=_int(env, "EVENT_MAX_ATTEMPTS", 8, 1, 100),
        relay_batch_size=_int(env, "RELAY_BATCH_SIZE", 200, 1, 10_000),
        database_statement_timeout_ms=_int(
            env, "DATABASE_STATEMENT_TIMEOUT_MS", 30_000, 0, 3_600_000
        ),
        recovery_mode=_choice(env, "RECOVERY_MODE", RECOVERY_MODES, "auto"),
        plans_file=env.get("RECOVERY_PLANS_FILE", "").strip() or None,
        stripe_write_rate=float(_int(env, "STRIPE_WRITE_RATE", 20, 1, 10_000)),
        stripe_read_rate=float(_int(env, "STRIPE_READ_RATE", 20, 1, 10_000)),
        visa_max_attempts_30d=_int(env, "VISA_MAX_ATTEMPTS_30D", VISA_MAX_ATTEMPTS_30D, 1, 20),
        retry_learning=_choice(env, "RETRY_LEARNING", ("on", "off"), "off") == "on",
        backup_cards=_choice(env, "BACKUP_CARDS", ("on", "off"), "on") == "on",
        backup_cards_exclude=_customer_ids(env, "BACKUP_CARDS_EXCLUDE"),
        step_lease_seconds=_int(env, "STEP_LEASE_SECONDS", 300, 5, 86_400),
        dispatch_batch_size=_int(env, "DISPATCH_BATCH_SIZE", 500, 1, 10_000),
        card_update_min_gap_seconds=_int(env, "CARD_UPDATE_MIN_GAP_SECONDS", 300, 0, 86_400),
        smtp_host=env.get("SMTP_HOST", "").strip() or None,
        smtp_port=_int(env, "SMTP_PORT", 587, 1, 65_535),
        smtp_username=env.get("SMTP_USERNAME", "").strip() or None,
        smtp_password=env.get("SMTP_PASSWORD", "") or None,
        smtp_security=_choice(env, "SMTP_SECURITY", SMTP_SECURITY, "starttls"),
        email_from=_email(env, "EMAIL_FROM", "Billing <billing@example.com>"),
        outbox_dir=env.get("OUTBOX_DIR", "").strip() or "var/outbox",
        brand_name=env.get("BRAND_NAME", "").strip() or "Our service",
        brand_support_email=_email(env, "BRAND_SUPPORT_EMAIL", "support@example.com"),
        brand_logo_url=_url(env, "BRAND_LOGO_URL", None, ("https", "http")),
        brand_accent_color=_colour(env, "BRAND_ACCENT_COLOR", "#635bff"),
        link_ttl_days=_int(env, "LINK_TTL_DAYS", 14, 1, 90),
        link_clicks_per_minute=_int(env, "LINK_CLICKS_PER_MINUTE", 30, 1, 100_000),
        trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
        metrics_token=env.get("METRICS_TOKEN", "").strip() or None,
        templates_dir=_directory(env, "TEMPLATES_DIR", DEFAULT_TEMPLATES_DIR),
        outbound_allowed_networks=_networks(env, "OUTBOUND_ALLOWED_NETWORKS"),
        alert_urls=_alert_urls(env, "ALERT_URLS"),
        alert_overdue_minutes=_int(env, "ALERT_OVERDUE_MINUTES", 15, 1, 10_080),
        api_requests_per_minute=_int(env, "API_REQUESTS_PER_MINUTE", 600, 1, 1_000_000),
        notice_secret=_notice_secret(env, "NOTICE_SECRET"),
        embed_allowed_origins=_origins(env, "EMBED_ALLOWED_ORIGINS"),
        twilio_account_sid=env.get("TWILIO_ACCOUNT_SID", "").strip() or None,
        twilio_auth_token=env.get("TWILIO_AUTH_TOKEN", "").strip() or None,
        twilio_from=env.get("TWILIO_FROM", "").strip() or None,
        twilio_api_base=_url(env, "TWILIO_API_BASE", None, ("https", "http")),
        sms_dir=env.get("SMS_DIR", "").strip() or "var/sms",
        sms_consent_metadata_key=env.get("SMS_CONSENT_METADATA_KEY", "").strip() or "sms_consent",
        sms_max_per_case=_int(env, "SMS_MAX_PER_CASE", 2, 0, 20),
    )
    if production:
        # A value already refused is not judged again as a production value.
        refused = {_variable(problem) for problem in env.problems}
        env.problems += [p for p in _production_problems(settings) if _variable(p) not in refused]
    if env.problems:
        raise ConfigError(*env.problems)
    return settings


# What production takes for a Stripe key and a signing secret: the shapes
# Stripe issues (a key's random part is 24 characters or more, a secret's 32).
_STRIPE_KEY = re.compile(r"(sk|rk)_(live|test)_[0-9A-Za-z]{20,}")
_WEBHOOK_SECRET = re.compile(r"whsec_[0-9A-Za-z+/=]{24,}")
# Words that mark a value as a placeholder someone forgot to fill in.
_PLACEHOLDER = re.compile(r"replace|change_?me|your_|example|placeholder|xxxx|dummy", re.I)
# Names reserved for documentation (RFC 2606, RFC 6761): never a real service.
_RESERVED_HOSTS = re.compile(
    r"(^|\.)(example\.(com|net|org)|example|test|invalid|localhost)$|^127\.|^0\.0\.0\.0$|^::1$"
)


def _variable(problem: str) -> str:
    """The variable a problem names: every problem starts with it."""
    found = re.match(r"[A-Z][A-Z0-9_]*", problem)
    return found.group() if found else ""


def _production_problems(settings: Settings) -> list[str]:
    """Production runs on real credentials and real servers only: a
    development default, a placeholder from .env.example or a malformed key
    is a problem, named by its variable."""
    problems = []
    key = settings.stripe_api_key
    if key == DEV_STRIPE_API_KEY or _PLACEHOLDER.search(key) or not _STRIPE_KEY.fullmatch(key):
        problems.append(
            "STRIPE_API_KEY is a placeholder, the development key or not a Stripe key "
            "(sk_live_… / rk_live_… from the Dashboard) while RECOVERY_ENV=production"
        )
    if any(
        secret == DEV_WEBHOOK_SECRET
        or _PLACEHOLDER.search(secret)
        or not _WEBHOOK_SECRET.fullmatch(secret)
        for secret in settings.stripe_webhook_secrets
    ):
        problems.append(
            "STRIPE_WEBHOOK_SECRET holds a placeholder, the public development "
            "secret or a malformed value (whsec_… from the webhook endpoint) "
            "while RECOVERY_ENV=production"
        )
    if not settings.smtp_host:
        problems.append(
            "SMTP_HOST is required when RECOVERY_ENV=production (without it emails "
            "would only be written to files)"
        )
    public = urlsplit(settings.public_base_url)
    if public.scheme != "https" or _RESERVED_HOSTS.search((public.hostname or "").lower()):
        problems.append(
            "PUBLIC_BASE_URL must be the https address customers reach this service "
            f"at when RECOVERY_ENV=production (got {public.scheme}://{public.hostname})"
        )
    for name, address in (
        ("EMAIL_FROM", settings.email_from),
        ("BRAND_SUPPORT_EMAIL", settings.brand_support_email),
    ):
        domain = address.rsplit("<", 1)[-1].rstrip(">").rpartition("@")[2].lower()
        if _RESERVED_HOSTS.search(domain):
            problems.append(f"{name} is still a placeholder address ({domain})")
    return problems


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call get_settings.cache_clear() to reload."""
    return load_settings()
