"""The WSGI app: the Stripe webhook receiver and the health routes.

Kept framework-free: the receiver is the hot path during billing runs and does
no more than verify, insert and answer.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from recovery.config import Settings, get_settings
from recovery.db import get_engine
from recovery.inbox_writer import InboxWriter
from recovery.webhooks import (
    MAX_BODY_BYTES,
    WebhookRejected,
    inbox_row,
    parse_event,
    verify_signature,
)

log = structlog.get_logger("recovery.web")

_JSON = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
_REASONS = {
    200: "200 OK",
    400: "400 Bad Request",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    503: "503 Service Unavailable",
}


def _respond(start_response, status: int, body: dict) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(_REASONS[status], [*_JSON, ("Content-Length", str(len(data)))])
    return [data]


def _read_body(environ) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise WebhookRejected("invalid Content-Length", 400) from None
    if length > MAX_BODY_BYTES:
        raise WebhookRejected("body larger than 1 MiB", 413)
    stream = environ["wsgi.input"]
    if length:
        return stream.read(length)
    # No length (chunked): read one byte past the limit to tell if it is over.
    body = stream.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise WebhookRejected("body larger than 1 MiB", 413)
    return body


def receive_webhook(environ, start_response, settings: Settings, writer: InboxWriter):
    try:
        payload = _read_body(environ)
        verify_signature(
            payload,
            environ.get("HTTP_STRIPE_SIGNATURE"),
            settings.stripe_webhook_secrets,
            settings.webhook_tolerance_seconds,
            time.time(),
        )
        event = parse_event(payload)
    except WebhookRejected as rejected:
        log.warning("webhook_rejected", reason=rejected.reason, status=rejected.status)
        return _respond(start_response, rejected.status, {"error": rejected.reason})

    try:
        stored = writer.store(inbox_row(event, payload, datetime.now(UTC)))
    except (DBAPIError, SQLAlchemyError, TimeoutError) as exc:
        # Not acknowledged, so Stripe delivers it again later.
        log.error("webhook_store_failed", event_id=event.id, error=type(exc).__name__)
        return _respond(start_response, 503, {"error": "database unavailable, retry later"})
    if not stored:
        log.debug("webhook_duplicate", event_id=event.id, event_type=event.type)
    return _respond(start_response, 200, {"received": True, "duplicate": not stored})


def database_ready() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except (DBAPIError, SQLAlchemyError):
        return False


def make_app(settings: Settings | None = None):
    settings = settings or get_settings()
    writer = InboxWriter(get_engine())

    def app(environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == "/webhooks/stripe":
            if method != "POST":
                return _respond(start_response, 405, {"error": "use POST"})
            return receive_webhook(environ, start_response, settings, writer)
        if path == "/healthz":
            return _respond(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            if database_ready():
                return _respond(start_response, 200, {"status": "ready"})
            return _respond(start_response, 503, {"status": "database unavailable"})
        return _respond(start_response, 404, {"error": "not found"})

    return app
