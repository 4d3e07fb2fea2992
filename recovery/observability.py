"""Logging (structlog) and error reporting (Sentry), configured once per process.

Both pass through one scrubber: no secret, token, email address or card datum
reaches a log line or a Sentry event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from sentry_sdk.types import Event

from recovery.config import Settings

REDACTED = "[redacted]"

# Keys whose values are never logged, whatever they hold.
_SENSITIVE_KEY = re.compile(
    r"(secret|password|passwd|token|api_key|apikey|authorization|signature|cookie|"
    r"email|phone|card_number|fingerprint|last4|exp_month|exp_year|cvc|dsn|customer_name|"
    r"address)",
    re.IGNORECASE,
)
# Values that are sensitive wherever they appear, even inside free text.
_SENSITIVE_VALUE = re.compile(
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"  # email addresses
    r"|\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9_]+"  # Stripe keys
    r"|\bwhsec_[A-Za-z0-9_]+"  # webhook secrets
    r"|\bv1=[0-9a-f]{16,}"  # signatures
    r"|\b(?:\d[ -]?){13,19}\b"  # card numbers
)
_SAFE_KEYS = frozenset({"event", "event_type", "logger", "level", "timestamp"})


def scrub_text(text: str) -> str:
    # A NUL cannot be stored in a PostgreSQL text column: an error quoting
    # one would never be recorded, and its event never end.
    return _SENSITIVE_VALUE.sub(REDACTED, text).replace("\x00", "\\x00")


def scrub(value: Any, key: str | None = None) -> Any:
    if key is not None and key not in _SAFE_KEYS and _SENSITIVE_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def _scrub_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    return {k: scrub(v, k) for k, v in event_dict.items()}


def configure_logging(settings: Settings, stream=None) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(settings.log_level)
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=settings.log_level, stream=stream or sys.stderr, force=True)
    # Beat announces every send, and the inbox sweep runs every second: at
    # INFO that drowns everything else. DEBUG still shows it.
    beat_level = logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    logging.getLogger("celery.beat").setLevel(beat_level)


def sentry_before_send(event: Event, _hint: dict[str, Any]) -> Event | None:
    """Drop request bodies and cookies, scrub everything else."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        headers = request.get("headers")
        request["headers"] = {
            k: v
            for k, v in (headers.items() if isinstance(headers, dict) else ())
            if k.lower() not in ("stripe-signature", "authorization", "cookie")
        }
    return scrub(event)


def init_sentry(settings: Settings) -> bool:
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.env,
        send_default_pii=False,
        include_local_variables=False,
        before_send=sentry_before_send,
        integrations=[CeleryIntegration(), SqlalchemyIntegration()],
    )
    return True


def configure(settings: Settings) -> None:
    configure_logging(settings)
    init_sentry(settings)
