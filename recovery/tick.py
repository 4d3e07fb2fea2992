"""One full pass as of an instant: pending inbox events, then the steps due.

`recovery tick --now T --sync` runs it in-process with the clock at T, so an
outside driver (tests, the demo, backtests) moves a plan through simulated
weeks with the same code that runs in production.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from recovery import clock, delivery, inbox, outbox, steps
from recovery.config import Settings

log = structlog.get_logger("recovery.tick")


@dataclass
class PassResult:
    events: int = 0
    steps: int = 0
    emails: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def follow_simulated_clock(settings: Settings, at: datetime) -> None:
    """Set the Stripe-compatible server's clock too, when one is configured."""
    if not settings.stripe_api_base:
        return
    request = urllib.request.Request(
        f"{settings.stripe_api_base.rstrip('/')}/_sim/clock",
        data=json.dumps({"now": at.timestamp()}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except OSError as exc:  # a real Stripe has no such route; its clock is its own
        log.info("stripe_clock_not_set", error=type(exc).__name__)


def run_pass(
    settings: Settings, sync: bool, publish_events=None, publish_steps=None, publish_messages=None
) -> PassResult:
    """Process due events and steps as of clock.now(); in-process when `sync`."""
    now = clock.now()
    result = PassResult()
    while True:
        batch: list[int] = []
        sent = inbox.relay(batch.extend if sync else publish_events, now, settings.relay_batch_size)
        result.events += sent
        if sync:
            inbox.process_events(batch, now, settings)
        if sent < settings.relay_batch_size:
            break

    def run_here(claims: list[steps.Claim]) -> None:
        for outcome in steps.execute_all(claims, now, settings).values():
            key = outcome or "stale_claim"
            result.outcomes[key] = result.outcomes.get(key, 0) + 1

    result.steps = steps.dispatch(now, settings, run_here if sync else publish_steps)

    def send_here(ids: list[int]) -> None:
        for outcome in delivery.send_all(ids, now, settings).values():
            key = f"email_{outcome or 'stale'}"
            result.outcomes[key] = result.outcomes.get(key, 0) + 1

    outbox.release_lapsed(now)
    result.emails = outbox.dispatch(now, send_here if sync else publish_messages)
    return result
