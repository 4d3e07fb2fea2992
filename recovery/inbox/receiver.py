"""The webhook receiver: verify a Stripe delivery, check it, store it once, answer.

No business logic happens here. A verified event becomes an inbox row; many
concurrent requests share one INSERT … ON CONFLICT DO NOTHING and one COMMIT
(group commit, below), and each answers 2xx only after that commit, so a 2xx
means the event is durable. The relay hands stored events to workers later
(relay.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from psycopg2.extras import execute_values
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from recovery import clock
from recovery.config import Settings
from recovery.db import insert_ignore_returning
from recovery.models import EventStatus, WebhookEvent

log = structlog.get_logger("recovery.receiver")

MAX_BODY_BYTES = 1024 * 1024


class WebhookRejected(Exception):
    """A delivery we refuse; `reason` is safe to return to the sender and to log."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature Stripe sends for `payload` at `timestamp`."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(payload: bytes, secret: str, timestamp: int) -> str:
    return f"t={timestamp},v1={sign(payload, secret, timestamp)}"


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Iterable[str],
    tolerance: int,
    now: float,
) -> None:
    """Raise WebhookRejected unless one v1 signature matches one of our secrets."""
    if not header:
        raise WebhookRejected("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookRejected("malformed Stripe-Signature timestamp") from None
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookRejected("Stripe-Signature header has no timestamp or no v1 signature")
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected("Stripe-Signature timestamp outside the tolerance window")
    # Every candidate is compared against every secret, so the time taken does
    # not depend on which (if any) matched.
    matched = False
    for secret in secrets:
        expected = sign(payload, secret, timestamp)
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise WebhookRejected("no valid signature for this payload")


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    id: str
    type: str
    account: str | None
    livemode: bool
    api_version: str | None
    created: datetime


# What the inbox stores of an event's envelope, checked before storing: a
# value PostgreSQL would refuse (a NUL, an over-long text, a date past 9999)
# would otherwise fail the request, and every request sharing its commit.
_EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,251}")
_EVENT_TYPE = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+){0,7}")
_ACCOUNT = re.compile(r"acct_[A-Za-z0-9]{1,250}")
_API_VERSION = re.compile(r"[0-9A-Za-z._-]{1,64}")
LAST_CREATED = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime holds
# Stripe's objects nest a handful of levels; the workers' JSON parser gives
# out near a thousand.
MAX_DEPTH = 64


def _depth_within(payload: bytes, value: Any, limit: int) -> bool:
    # Every level opens with a brace or bracket: a body with few of them
    # (most events) is not walked at all.
    if payload.count(b"{") + payload.count(b"[") <= limit:
        return True
    level, depth = [value], 1
    while level:
        if depth > limit:
            return False
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) is dict or type(child) is list
        ]
        depth += 1
    return True


def _column_length(column: str) -> int:
    """The inbox column's own length: the one home of each limit."""
    length = getattr(WebhookEvent.__table__.c[column].type, "length", None)
    assert isinstance(length, int)  # noqa: S101 - every checked column is a VARCHAR
    return length


# The inbox columns each envelope field is stored in.
_STORED_IN = {
    "id": "stripe_event_id",
    "type": "type",
    "account": "account",
    "api_version": "api_version",
}
_LIMITS = {name: _column_length(column) for name, column in _STORED_IN.items()}


def _field(body: dict, name: str, pattern: re.Pattern[str], optional: bool = False) -> str | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise WebhookRejected(f"event field {name!r} is missing or malformed")
    if len(value) > _LIMITS[name]:
        raise WebhookRejected(f"event field {name!r} is longer than {_LIMITS[name]} characters")
    return value


def parse_event(payload: bytes) -> ParsedEvent:
    """Check that a verified body is a Stripe event; raise WebhookRejected if not."""
    try:
        # orjson: a quarter of the stdlib's time on a 4 KB event, on the hot path.
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise WebhookRejected("body is not valid JSON") from None
    if not isinstance(body, dict) or body.get("object") != "event":
        raise WebhookRejected("body is not a Stripe event")
    if not _depth_within(payload, body, MAX_DEPTH):
        raise WebhookRejected(f"event nested deeper than {MAX_DEPTH} levels")
    event_id = _field(body, "id", _EVENT_ID)
    event_type = _field(body, "type", _EVENT_TYPE)
    account = _field(body, "account", _ACCOUNT, optional=True)
    api_version = _field(body, "api_version", _API_VERSION, optional=True)
    created, livemode, data = body.get("created"), body.get("livemode"), body.get("data")
    if type(created) is not int or not 0 <= created <= LAST_CREATED:  # a bool is no time
        raise WebhookRejected("event field 'created' is not a time in seconds")
    if not isinstance(livemode, bool):
        raise WebhookRejected("event field 'livemode' is not true or false")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise WebhookRejected("event has no data.object")
    assert event_id is not None and event_type is not None  # not optional above
    return ParsedEvent(
        id=event_id,
        type=event_type,
        account=account,
        livemode=livemode,
        api_version=api_version,
        created=datetime.fromtimestamp(created, UTC),
    )


def inbox_row(event: ParsedEvent, payload: bytes, now: datetime) -> dict[str, Any]:
    """The inbox row for a verified event, ready to insert."""
    return {
        "stripe_event_id": event.id,
        "type": event.type,
        "account": event.account,
        "livemode": event.livemode,
        "api_version": event.api_version,
        "stripe_created_at": event.created,
        "received_at": now,
        "payload": payload.decode("utf-8"),
        "status": EventStatus.PENDING.value,
        "attempts": 0,
        "enqueued_at": None,
        "last_error": None,
        "processed_at": None,
        "available_at": now,
    }


# -- group commit ------------------------------------------------------------------
#
# A commit costs a WAL flush; paying it per webhook caps a receiver at a few
# thousand events/s however fast the rest is. Requests on the event loop hand
# their row to one writer thread per process and await; the writer inserts
# whatever arrived while the previous batch was committing (no timer, so no
# added latency when idle) and settles every request of the batch only after
# the COMMIT. The batch is settled with one wake-up of the event loop, not one
# per request.

MAX_BATCH = 200
# How long a request waits for its commit before answering 503: a stalled
# database is a quick 503 (Stripe retries), not a held connection. A commit
# that lands after the 503 only makes Stripe's retry a duplicate.
WAIT_SECONDS = 1.5

Pending = tuple[dict[str, Any], asyncio.AbstractEventLoop, "asyncio.Future[bool]"]


class InboxWriter:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queue: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        # Started lazily and per process: a thread does not survive fork.
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, daemon=True, name="inbox-writer").start()
                self._pid = os.getpid()

    async def store(self, row: dict) -> bool:
        """Insert one inbox row; True if new, False if the event was already stored.
        Returns after the COMMIT; raises the database error, or TimeoutError."""
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((row, loop, future))
        async with asyncio.timeout(WAIT_SECONDS):
            return await future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outcomes = self._write([row for row, _, _ in batch])
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for (_, loop, future), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, settled in by_loop.items():
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_settle, settled)

    def _write(self, rows: list[dict]) -> list[bool | Exception]:
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    inserted = _insert_postgres(conn, rows)
                else:
                    inserted = insert_ignore_returning(conn, WebhookEvent, rows, "stripe_event_id")
        except Exception as exc:  # noqa: BLE001 - every waiting request answers 503
            if len(rows) > 1 and not _database_unreachable(exc):
                # One row the database refuses must not fail the others that
                # happened to share its commit: each is written on its own.
                return [outcome for row in rows for outcome in self._write([row])]
            return [exc] * len(rows)
        outcomes: list[bool | Exception] = []
        for row in rows:
            # The same event twice in one batch: only the first is "new".
            key = row["stripe_event_id"]
            outcomes.append(key in inserted)
            inserted.discard(key)
        return outcomes


def _database_unreachable(exc: Exception) -> bool:
    """The database, not a row, is the problem: retrying row by row would only
    multiply the wait."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, TimeoutError | OSError)


def _settle(settled: list[tuple[asyncio.Future, bool | Exception]]) -> None:
    for future, outcome in settled:
        if future.done():  # the request timed out or its client went away
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


_COLUMNS = (
    "stripe_event_id",
    "type",
    "account",
    "livemode",
    "api_version",
    "stripe_created_at",
    "received_at",
    "payload",
    "status",
    "attempts",
    "available_at",
)
_INSERT = (
    f"INSERT INTO webhook_events ({', '.join(_COLUMNS)}) VALUES %s "
    "ON CONFLICT (stripe_event_id) DO NOTHING RETURNING stripe_event_id"
)


def _insert_postgres(conn: Connection, rows: list[dict]) -> set[str]:
    """The same INSERT … ON CONFLICT DO NOTHING as insert_ignore_returning, through
    psycopg2 directly: half the client CPU per row of SQLAlchemy's
    insertmanyvalues, measured, and the client is the receiver's bottleneck."""
    raw = conn.connection.dbapi_connection
    if raw is None:
        raise RuntimeError("the connection was closed before the insert")
    cursor = raw.cursor()
    try:
        values = [tuple(row[column] for column in _COLUMNS) for row in rows]
        returned = execute_values(cursor, _INSERT, values, page_size=MAX_BATCH, fetch=True)
    finally:
        cursor.close()
    return {event_id for (event_id,) in returned}


# -- the request ---------------------------------------------------------------------

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


async def read_body(scope: dict, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing more than `limit` bytes (1 MiB) whether or
    not a length was sent."""
    declared = _header(scope, b"content-length")
    too_large = "body larger than " + (
        f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit} bytes"
    )
    if declared is not None:
        if not declared.isdigit():
            raise WebhookRejected("invalid Content-Length", 400)
        if int(declared) > limit:
            raise WebhookRejected(too_large, 413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise WebhookRejected("client went away", 400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise WebhookRejected(too_large, 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _require_json(scope: dict) -> None:
    media_type = (_header(scope, b"content-type") or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise WebhookRejected("Content-Type must be application/json", 415)


async def receive_webhook(scope, receive, send, settings: Settings, writer: InboxWriter):
    try:
        _require_json(scope)
        payload = await read_body(scope, receive)
        verify_signature(
            payload,
            _header(scope, b"stripe-signature"),
            settings.stripe_webhook_secrets,
            settings.webhook_tolerance_seconds,
            time.time(),
        )
        event = parse_event(payload)
        if event.livemode != settings.stripe_livemode:
            # Stored, it would only be ignored: a webhook endpoint of the
            # other mode is sending here, which its operator should see.
            mode = "live" if event.livemode else "test"
            raise WebhookRejected(f"a {mode}-mode event, and the API key is not {mode}-mode")
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
