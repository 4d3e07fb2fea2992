"""The business's webhook endpoints, as operators manage them.

A secret is `whsec_` and 24 random bytes in base64, as Standard Webhooks
libraries read it; it is shown once, when made, and kept to sign. Rotating
keeps the old secret signing beside the new one for 24 hours, so a receiver
can switch at its own pace.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from recovery.business import announce, egress
from recovery.config import Settings
from recovery.db import insert_ignore
from recovery.models import Announcement, Delivery, DeliveryStatus, Endpoint, EndpointStatus

ROTATION_OVERLAP = timedelta(hours=24)


class EndpointRefused(ValueError):
    """An endpoint or a change to one that cannot be made; the message says why."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def event_types(names: str | None) -> list[str] | None:
    """`--events a,b` as a list (None: every event), or why not."""
    if names is None or names.strip() in ("", "*", "all"):
        return None
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in announce.CASE_EVENTS]
    if unknown:
        raise EndpointRefused(
            f"unknown event type {unknown[0]!r}; one of: {', '.join(announce.CASE_EVENTS)}"
        )
    return wanted


def check_url(url: str, settings: Settings) -> None:
    problem = egress.check_url(url, require_https=settings.production)
    if problem is None:
        host = urlsplit(url).hostname or ""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None  # a name: checked at each connection, as it may change
        if literal is not None:
            why = egress.why_refused(literal, settings.outbound_allowed_networks)
            if why is not None:
                problem = f"{host} is {why}; allow its network in OUTBOUND_ALLOWED_NETWORKS"
    if problem is not None:
        raise EndpointRefused(problem)


def add(
    session: Session, url: str, events: list[str] | None, now: datetime, settings: Settings
) -> tuple[Endpoint, str]:
    """A new endpoint, enabled, hearing from now on; its secret."""
    check_url(url, settings)
    secret = new_secret()
    endpoint = Endpoint(
        url=url,
        events=events,
        secret=secret,
        status=EndpointStatus.ENABLED,
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def get(session: Session, endpoint_id: int, lock: bool = True) -> Endpoint:
    endpoint = session.get(Endpoint, endpoint_id, with_for_update=lock)
    if endpoint is None:
        raise EndpointRefused(f"no endpoint {endpoint_id} (see `recovery endpoints list`)")
    return endpoint


def set_enabled(session: Session, endpoint: Endpoint, enabled: bool, now: datetime) -> None:
    """Enabling starts afresh: what waited while it was disabled goes now."""
    endpoint.status = EndpointStatus.ENABLED if enabled else EndpointStatus.DISABLED
    endpoint.disabled_reason = None if enabled else "an operator disabled it"
    endpoint.failing_since = None
    endpoint.updated_at = now
    if enabled:
        session.execute(
            update(Delivery)
            .where(Delivery.endpoint_id == endpoint.id, Delivery.status == DeliveryStatus.PENDING)
            .values(next_attempt_at=now)
        )


def rotate(session: Session, endpoint: Endpoint, now: datetime) -> str:
    """A new secret; the old one signs beside it for ROTATION_OVERLAP."""
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_until = now + ROTATION_OVERLAP
    endpoint.secret = new_secret()
    endpoint.updated_at = now
    return endpoint.secret


def replay(session: Session, endpoint: Endpoint, since: datetime, now: datetime) -> int:
    """Deliver again every event since `since` the endpoint hears, with the
    same ids (a receiver drops those it has): delivered or failed ones are
    tried anew, missing ones (the endpoint was added later) are made."""
    found = session.execute(
        select(Announcement.id, Announcement.type)
        .where(Announcement.created_at >= since, Announcement.type != announce.PING)
        .order_by(Announcement.id)
    ).all()
    count = 0
    for announcement_id, type_ in found:
        if not announce.hears(endpoint, type_):
            continue
        insert_ignore(
            session,
            Delivery,
            {
                "endpoint_id": endpoint.id,
                "announcement_id": announcement_id,
                "status": DeliveryStatus.PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            },
            ["endpoint_id", "announcement_id"],
        )
        count += 1
    heard = select(Announcement.id).where(
        Announcement.created_at >= since, Announcement.type != announce.PING
    )
    if endpoint.events is not None:
        heard = heard.where(Announcement.type.in_(endpoint.events))
    session.execute(
        update(Delivery)
        .where(
            Delivery.endpoint_id == endpoint.id,
            Delivery.announcement_id.in_(heard.scalar_subquery()),
            Delivery.status.in_((DeliveryStatus.DELIVERED, DeliveryStatus.FAILED)),
        )
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=now)
    )
    return count
