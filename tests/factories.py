"""Test data built from Stripe's example objects (recovery/stripe_sim/fixtures.json)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from recovery.inbox.receiver import signature_header
from recovery.sim import objects

from .conftest import WEBHOOK_SECRET


def stripe_event(
    event_type: str,
    obj: dict,
    *,
    created: int | None = None,
    livemode: bool = False,
    previous: dict | None = None,
) -> dict:
    return objects.event(
        created or int(time.time()), event_type, obj, livemode, "2026-10-28.endive", previous
    )


def invoice_object(**fields) -> dict:
    invoice = objects.example("invoice")
    invoice.update(
        id=objects.new_id("in"),
        status="open",
        amount_due=2000,
        amount_remaining=2000,
        currency="usd",
        customer="cus_test",
        customer_email="jenny.rosen@example.com",
    )
    invoice.update(fields)
    return invoice


def signed_headers(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None):
    header = signature_header(body, secret, int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "Stripe-Signature": header}


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_event(receiver_url: str, event: dict, secret: str = WEBHOOK_SECRET):
    body = json.dumps(event).encode()
    return post(f"{receiver_url}/webhooks/stripe", body, signed_headers(body, secret))


def sim_post(sim_url: str, path: str, body: dict | None = None) -> dict:
    status, answer = post(
        f"{sim_url}{path}", json.dumps(body or {}).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, answer
    return answer
