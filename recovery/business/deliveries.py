"""Deliveries to the business's endpoints: at least once, on Svix's schedule.

    pending ─claim─▶ claimed ─POST─▶ delivered (2xx)
       ▲                │ anything else: the next attempt of the schedule,
       └────────────────┘ after the last one failed (visible, replayable)

Every attempt of a delivery carries its announcement's public id as
`webhook-id`, so a receiver that saw it drops the repeat; the timestamp is
the attempt's and the body is signed with the endpoint's secret, and during
a rotation with the previous one too (both signatures in the header).

An endpoint is worked by one batch at a time, ordered by its events, and a
batch stops hitting an endpoint that failed: the rest of the batch take the
same failure and their next attempt, so a slow or dead endpoint holds one
worker slot of the `webhooks` queue, never the engine's, and no other
endpoint waits behind it. A 410 disables the endpoint at once; one failing
for five days is disabled too, and operators are alerted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import or_, select, update
from standardwebhooks.webhooks import Webhook

from recovery import __version__, clock
from recovery.business import alerts, announce, egress
from recovery.config import Settings
from recovery.customers import links, standing
from recovery.db import dialect_of, session_scope
from recovery.models import (
    Announcement,
    Delivery,
    DeliveryStatus,
    Endpoint,
    EndpointStatus,
)

log = structlog.get_logger("recovery.deliveries")

# Svix's schedule: the wait before each attempt, the first one at once.
SCHEDULE = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
DISABLE_AFTER = timedelta(days=5)
PER_ENDPOINT = 20
# Longer than a batch can take: PER_ENDPOINT attempts never run past one
# timeout, as the first that times out ends the batch's attempts.
LEASE = timedelta(seconds=2 * egress.TIMEOUT_SECONDS + 60)


def wait_after(attempts: int) -> timedelta | None:
    """The wait before the next attempt after `attempts` have failed, or None
    when the schedule is spent."""
    return SCHEDULE[attempts] if attempts < len(SCHEDULE) else None


@dataclass(frozen=True)
class Batch:
    endpoint_id: int
    delivery_ids: list[int]


def _due(now: datetime) -> Any:
    return or_(
        (Delivery.status == DeliveryStatus.PENDING) & (Delivery.next_attempt_at <= now),
        # A worker lost mid-batch: its deliveries go again, with the same id.
        (Delivery.status == DeliveryStatus.CLAIMED) & (Delivery.lease_until <= now),
    )


def claim(now: datetime, limit: int = 1000) -> list[Batch]:
    """Claim due deliveries of enabled endpoints that no batch is working,
    PER_ENDPOINT at most for each, in the order their events happened."""
    with session_scope() as session:
        busy = select(Delivery.endpoint_id).where(
            Delivery.status == DeliveryStatus.CLAIMED, Delivery.lease_until > now
        )
        candidates = (
            select(Delivery.id, Delivery.endpoint_id)
            .join(Endpoint, Endpoint.id == Delivery.endpoint_id)
            .where(
                _due(now),
                Endpoint.status == EndpointStatus.ENABLED,
                Delivery.endpoint_id.not_in(busy),
            )
            .order_by(Delivery.announcement_id)
            .limit(limit)
        )
        if dialect_of(session) == "postgresql":
            candidates = candidates.with_for_update(of=Delivery, skip_locked=True)
        chosen: dict[int, list[int]] = {}
        for delivery_id, endpoint_id in session.execute(candidates):
            of_endpoint = chosen.setdefault(endpoint_id, [])
            if len(of_endpoint) < PER_ENDPOINT:
                of_endpoint.append(delivery_id)
        ids = [i for of_endpoint in chosen.values() for i in of_endpoint]
        if not ids:
            return []
        claimed = set(
            session.scalars(
                update(Delivery)
                .where(Delivery.id.in_(ids), _due(now))
                .values(status=DeliveryStatus.CLAIMED, lease_until=now + LEASE)
                .returning(Delivery.id)
            )
        )
    return [
        Batch(endpoint_id, [i for i in of_endpoint if i in claimed])
        for endpoint_id, of_endpoint in chosen.items()
        if claimed.intersection(of_endpoint)
    ]


def dispatch(now: datetime, hand_off: Callable[[Batch], None]) -> int:
    """Claim what is due and hand each endpoint's batch to `hand_off`."""
    total = 0
    for batch in claim(now):
        hand_off(batch)
        total += len(batch.delivery_ids)
    return total


# -- one batch ------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    delivery_id: int
    public_id: str
    type: str
    body: bytes


def body_of(announcement: Announcement, extra: dict[str, Any] | None = None) -> bytes:
    """The JSON every attempt sends: Standard Webhooks' type, timestamp, data."""
    data = dict(announcement.data) | (extra or {})
    envelope = {
        "type": announcement.type,
        "timestamp": announce.iso(announcement.created_at),
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


def signature(secrets: list[str], public_id: str, at: datetime, body: bytes) -> str:
    return " ".join(Webhook(secret).sign(public_id, at, body) for secret in secrets)


def live_secrets(endpoint: Endpoint, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and for 24 hours after a
    rotation the previous one beside it."""
    kept = endpoint.previous_secret_until is not None and endpoint.previous_secret_until > now
    return [endpoint.secret] + (
        [endpoint.previous_secret] if kept and endpoint.previous_secret else []
    )


def _fresh_link(
    session: Any, announcement: Announcement, now: datetime, settings: Settings
) -> dict[str, Any]:
    """A link for the customer to act through, minted for this attempt: its
    token is never stored."""
    purpose = standing.link_purpose(announcement.data.get("action"))
    assert announcement.case_id is not None  # noqa: S101 - a case event's
    url, expires = links.handed_out(
        session, purpose, announcement.case_id, now, settings, "webhook"
    )
    return {"link": {"url": url, "expires_at": announce.iso(expires)}}


def send(batch: Batch, settings: Settings, even_disabled: bool = False) -> dict[int, str]:
    """Attempt a claimed batch of one endpoint's deliveries, in order; the
    outcome of each ('delivered', 'retrying', 'failed', or why it was not
    ours). `even_disabled`: an operator's test of an endpoint still disabled."""
    now = clock.now()
    with session_scope() as session:
        endpoint = session.get(Endpoint, batch.endpoint_id)
        rows = session.execute(
            select(Delivery, Announcement)
            .join(Announcement, Announcement.id == Delivery.announcement_id)
            .where(Delivery.id.in_(batch.delivery_ids), Delivery.status == DeliveryStatus.CLAIMED)
            .order_by(Announcement.id)
        ).all()
        if endpoint is None or (
            endpoint.status is not EndpointStatus.ENABLED and not even_disabled
        ):
            # Disabled after the claim: the deliveries wait for it to be enabled.
            session.rollback()
            return dict.fromkeys(_release([d.id for d, _ in rows]), "endpoint_disabled")
        url, secrets = endpoint.url, live_secrets(endpoint, now)
        prepared = []
        for delivery, announcement in rows:
            extra = None
            if announcement.type == announce.CUSTOMER_ACTION_REQUIRED and announcement.case_id:
                extra = _fresh_link(session, announcement, now, settings)
            prepared.append(
                Prepared(
                    delivery.id,
                    announcement.public_id,
                    announcement.type,
                    body_of(announcement, extra),
                )
            )
    outcomes: dict[int, str] = {}
    failure: str | None = None
    for number, item in enumerate(prepared):
        if failure is not None:
            outcomes[item.delivery_id] = record(
                item.delivery_id, None, f"not sent: {failure} earlier in this batch", None, settings
            )
            continue
        status, error, body = attempt(url, secrets, item, settings)
        outcomes[item.delivery_id] = record(item.delivery_id, status, error, body, settings)
        if status == 410:
            # Disabled now: the rest wait, untried, for it to be enabled.
            rest = [p.delivery_id for p in prepared[number + 1 :]]
            outcomes.update(dict.fromkeys(_release(rest), "endpoint_disabled"))
            break
        if outcomes[item.delivery_id] != "delivered":
            failure = error or f"HTTP {status}"
    return outcomes


def _release(delivery_ids: list[int]) -> list[int]:
    """Claimed deliveries given back untried."""
    with session_scope() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(delivery_ids), Delivery.status == DeliveryStatus.CLAIMED)
            .values(status=DeliveryStatus.PENDING, lease_until=None)
        )
    return delivery_ids


def attempt(
    url: str, secrets: list[str], item: Prepared, settings: Settings
) -> tuple[int | None, str | None, str | None]:
    """One POST: the status, an error worth keeping, the answer's first KiB."""
    # The wall clock, not the engine's: a receiver compares this timestamp
    # with its own clock to refuse replays, whatever time a simulation runs at.
    at = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "user-agent": f"recovery/{__version__}",
        "webhook-id": item.public_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature(secrets, item.public_id, at, item.body),
    }
    try:
        answer = egress.post(
            url, item.body, headers, settings.outbound_allowed_networks, settings.production
        )
    except egress.Refused as refused:
        return None, f"refused: {refused}"[:255], None
    except TimeoutError:
        return None, f"no answer within {egress.TIMEOUT_SECONDS:g} s", None
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc.strerror or exc}"[:255], None
    return (
        answer.status,
        None if 200 <= answer.status < 300 else f"HTTP {answer.status}",
        answer.body,
    )


def record(
    delivery_id: int,
    status: int | None,
    error: str | None,
    body: str | None,
    settings: Settings,
) -> str:
    """Keep an attempt's answer; schedule the next attempt, or end the delivery."""
    now = clock.now()
    disabled: str | None = None
    with session_scope() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.status is not DeliveryStatus.CLAIMED:
            return "stale"
        endpoint = session.get(Endpoint, delivery.endpoint_id, with_for_update=True)
        assert endpoint is not None  # noqa: S101 - a delivery's endpoint is never deleted
        delivery.attempts += 1
        delivery.last_attempt_at, delivery.lease_until = now, None
        delivery.last_status_code, delivery.last_error = status, error
        delivery.response_body = body
        if status is not None and 200 <= status < 300:
            delivery.status, delivery.delivered_at = DeliveryStatus.DELIVERED, now
            endpoint.failing_since = None
            return "delivered"
        endpoint.failing_since = endpoint.failing_since or now
        wait = wait_after(delivery.attempts)
        if status == 410:
            disabled = "the endpoint answered 410 Gone"
            delivery.status = DeliveryStatus.FAILED
        elif wait is None:
            delivery.status = DeliveryStatus.FAILED
        else:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.PENDING, now + wait
        if disabled is None and now - endpoint.failing_since >= DISABLE_AFTER:
            disabled = f"failing since {endpoint.failing_since:%Y-%m-%d %H:%M}Z"
        if disabled is not None and endpoint.status is EndpointStatus.ENABLED:
            endpoint.status, endpoint.disabled_reason = EndpointStatus.DISABLED, disabled
            endpoint.updated_at = now
            log.warning("endpoint_disabled", endpoint_id=endpoint.id, why=disabled)
        else:
            disabled = None
        outcome = delivery.status.value if delivery.status is DeliveryStatus.FAILED else "retrying"
        endpoint_id = endpoint.id
    if disabled is not None:
        alerts.endpoint_disabled(endpoint_id, disabled, now, settings)
    return outcome
