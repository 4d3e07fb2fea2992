"""Logging (structlog) and error reporting (Sentry), configured once per process.

Both pass through one scrubber: no secret, token, email address or card datum
reaches a log line or a Sentry event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog

from recovery import __version__
from recovery.config import Settings

if TYPE_CHECKING:
    from sentry_sdk.types import Event

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
    # PostgreSQL quotes the row it refused (a fingerprint, an address) in
    # its error's DETAIL line; SQLAlchemy's parameters are hidden at the engine.
    r"|(?<=DETAIL:)[^\n]*"
    # psycopg2 fills the values into the statement on the client, so the
    # statement PostgreSQL quotes back on its LINE carries them, and so does
    # a value it could not read ('invalid input syntax for type integer:
    # "…"', 'value "…" is out of range').
    r"|(?<=\nLINE )\d+:[^\n]*"
    r'|(?<=: )"[^"\n]*"(?=\n|$)'
    r'|(?<=value )"[^"\n]*"(?= is out of range)'
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
    # exc_info stays an exception for Sentry and the traceback formatter,
    # which scrub what they make of it.
    return {k: v if k == "exc_info" else scrub(v, k) for k, v in event_dict.items()}


def _scrub_traceback(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # The traceback's text exists only once format_exc_info made it.
    if "exception" in event_dict:
        event_dict["exception"] = scrub_text(str(event_dict["exception"]))
    return event_dict


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1]
    if exc_info is True:
        return sys.exc_info()[1]
    return None


_NOT_CONTEXT = frozenset({"exc_info", "_record", "_from_structlog"})


def _to_sentry(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Errors logged by us or by a library become Sentry events, once each,
    with the line's (scrubbed) fields as context."""
    level = str(event_dict.get("level", method)).lower()
    # Sentry is loaded only by a process that starts it (init_sentry): a
    # command that reads a table does not wait on it.
    sentry_sdk = sys.modules.get("sentry_sdk")
    if (
        level not in ("error", "critical", "exception")
        or sentry_sdk is None
        or not sentry_sdk.get_client().is_active()
    ):
        return event_dict
    fields = {k: v for k, v in event_dict.items() if k not in _NOT_CONTEXT}
    with sentry_sdk.new_scope() as scope:
        scope.set_context("log", fields)
        scope.set_tag("logger", str(fields.get("logger", "")))
        exc = _exception_of(event_dict.get("exc_info"))
        if exc is not None:
            sentry_sdk.capture_exception(exc)
        else:
            sentry_sdk.capture_message(str(fields.get("event", "")), level="error")
    return event_dict


# Libraries whose records go through the same formatter as ours (they log
# through the standard library); their own handlers are removed.
_LIBRARY_LOGGERS = (
    "celery",
    "celery.app.trace",
    "celery.worker",
    "celery.redirected",
    "kombu",
    "gunicorn.error",
    "gunicorn.access",
    "uvicorn",
    "uvicorn.error",
    "stripe",
    "sqlalchemy",
    "alembic",
    "py.warnings",
)


def configure_logging(settings: Settings, stream=None) -> None:
    """One configuration for the process: structlog's lines and every
    library's records leave through one handler, scrubbed, as JSON in
    production (console lines in development)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    stamped: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            *stamped,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*stamped, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _scrub_processor,
            _to_sentry,
            structlog.processors.format_exc_info,
            _scrub_traceback,
            renderer,
        ],
    )
    # Python's warnings (Celery's, the SDKs') are records like any other.
    logging.captureWarnings(True)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
    # uvicorn's access line holds the query string and the link token in the
    # path; the app writes its own (web.with_access_log). uvicorn writes one
    # whenever the logger has a handler anywhere up its tree.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
    # SQLAlchemy and the Stripe SDK are chatty below WARNING (every statement,
    # every request line), Alembic too (each plugin it sets up); their
    # warnings and errors still show, and `recovery db upgrade` says what ran.
    for name in ("sqlalchemy", "stripe", "kombu", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # Beat announces every send and the worker every task received and done,
    # and the inbox sweep runs every second: at INFO that drowns everything
    # else. DEBUG still shows it; a task's failure is an error, always shown.
    quiet = logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    for name in ("celery.beat", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(quiet)


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
    """Start Sentry in this process (a forked worker child needs its own
    client: the parent's sending thread does not survive the fork)."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.env,
        release=f"recovery@{__version__}",
        include_local_variables=False,
        before_send=sentry_before_send,
        # Log records reach Sentry through _to_sentry, scrubbed like the log
        # line; the integration would send them raw (and breadcrumbs too).
        default_integrations=False,
        integrations=[
            CeleryIntegration(),
            SqlalchemyIntegration(),
            LoggingIntegration(level=None, event_level=None),
        ],
    )
    return True


def configure(settings: Settings) -> None:
    configure_logging(settings)
    init_sentry(settings)
