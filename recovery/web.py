"""The web app: the Stripe webhook receiver, the customers' recovery links
(web_links.py) and the health routes (ASGI).

Framework-free ASGI rather than WSGI: the receiver is the hot path during
billing runs. Measured on the 2-core bench machine, gunicorn's threaded WSGI
worker tops out near 2,300 requests/s on an app that does nothing, and the
gevent worker near 4,100; the uvicorn worker (httptools, uvloop) serves the
same nothing at 14,000/s, which leaves room for the HMAC, the JSON parse and
the database. Requests never block the event loop: the insert happens on the
group-commit thread (inbox_writer.py) and anything else that is synchronous
runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from recovery import clock
from recovery.config import Settings, get_settings
from recovery.db import get_engine
from recovery.inbox_writer import InboxWriter
from recovery.web_links import make_links_app
from recovery.webhooks import (
    MAX_BODY_BYTES,
    WebhookRejected,
    inbox_row,
    parse_event,
    verify_signature,
)

log = structlog.get_logger("recovery.web")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]

_JSON = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


async def respond(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: dict, receive: Receive) -> bytes:
    """The request body, refusing more than 1 MiB whether or not a length was sent."""
    declared = _header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY_BYTES:
                raise WebhookRejected("body larger than 1 MiB", 413)
        except ValueError:
            raise WebhookRejected("invalid Content-Length", 400) from None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise WebhookRejected("client went away", 400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise WebhookRejected("body larger than 1 MiB", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def receive_webhook(scope, receive, send, settings: Settings, writer: InboxWriter):
    try:
        payload = await read_body(scope, receive)
        verify_signature(
            payload,
            _header(scope, b"stripe-signature"),
            settings.stripe_webhook_secrets,
            settings.webhook_tolerance_seconds,
            time.time(),
        )
        event = parse_event(payload)
    except WebhookRejected as rejected:
        log.warning("webhook_rejected", reason=rejected.reason, status=rejected.status)
        return await respond(send, rejected.status, {"error": rejected.reason})

    try:
        stored = await writer.store(inbox_row(event, payload, clock.now()))
    except (DBAPIError, SQLAlchemyError, TimeoutError) as exc:
        # Not acknowledged, so Stripe delivers it again later.
        log.error("webhook_store_failed", event_id=event.id, error=type(exc).__name__)
        return await respond(send, 503, {"error": "database unavailable, retry later"})
    if not stored:
        log.debug("webhook_duplicate", event_id=event.id, event_type=event.type)
    await respond(send, 200, {"received": True, "duplicate": not stored})


def database_ready() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except (DBAPIError, SQLAlchemyError):
        return False


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_app(settings: Settings | None = None):
    settings = settings or get_settings()
    writer = InboxWriter(get_engine())
    customer_pages = make_links_app(settings)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/webhooks/stripe":
            if method != "POST":
                return await respond(send, 405, {"error": "use POST"})
            return await receive_webhook(scope, receive, send, settings, writer)
        if path.startswith(("/r/", "/u/")):
            return await customer_pages(scope, receive, send)
        if path == "/healthz":
            return await respond(send, 200, {"status": "ok"})
        if path == "/readyz":
            if await asyncio.to_thread(database_ready):
                return await respond(send, 200, {"status": "ready"})
            return await respond(send, 503, {"status": "database unavailable"})
        await respond(send, 404, {"error": "not found"})

    return app
