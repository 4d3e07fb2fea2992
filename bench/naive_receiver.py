"""The receiver as it is often written, for comparison: Flask,
stripe.Webhook.construct_event, an ORM check-then-insert and a Celery
`delay()` inside every request."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import stripe
from flask import Flask, request
from sqlalchemy import select

from recovery.config import get_settings
from recovery.db import session_scope
from recovery.models import WebhookEvent
from recovery.tasks import process_events

app = Flask(__name__)
SECRET = get_settings().stripe_webhook_secrets[0]


@app.post("/webhooks/stripe")
def receive():
    payload = request.get_data()
    try:
        event = stripe.Webhook.construct_event(
            payload, request.headers.get("Stripe-Signature", ""), SECRET
        )
    except (ValueError, stripe.SignatureVerificationError):
        return {"error": "bad request"}, 400
    with session_scope() as session:
        existing = session.scalars(
            select(WebhookEvent).where(WebhookEvent.stripe_event_id == event.id)
        ).first()
        if existing is None:
            now = datetime.now(UTC)
            row = WebhookEvent(
                stripe_event_id=event.id,
                type=event.type,
                livemode=event.livemode,
                api_version=None,
                stripe_created_at=datetime.fromtimestamp(event.created, UTC),
                received_at=now,
                payload=payload.decode(),
                status="pending",
                attempts=0,
                available_at=now,
            )
            session.add(row)
            session.flush()
            row_id = row.id
        else:
            row_id = None
    if row_id is not None:
        process_events.delay([row_id])
    return json.dumps({"received": True}), 200
