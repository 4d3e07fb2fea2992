"""The Celery app and its thin, named tasks; the logic lives in the flow modules
(engine/scheduler.py, inbox/relay.py, engine/steps.py, customers/)."""

from __future__ import annotations

import runpy
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from recovery import clock, preflight
from recovery.business import alerts, deliveries
from recovery.config import ConfigError, explain, get_settings
from recovery.customers import delivery, outbox, texting
from recovery.db import reset_engine
from recovery.engine import scheduler, steps
from recovery.inbox import relay
from recovery.observability import configure
from recovery.paths import shipped
from recovery.stripe_api import key_works

# Steps per execute message: one message costs ~350 µs to publish, and 50
# steps at the default 20 Stripe writes/s still spread a backlog over workers.
STEP_CHUNK = 50
BEAT_SCHEDULE_FILE = shipped("celerybeat-schedule.py")
WEBHOOKS_QUEUE = "webhooks"
WEBHOOK_TASKS = ("recovery.send_deliveries", "recovery.dispatch_deliveries")


def load_beat_schedule(path: Path = BEAT_SCHEDULE_FILE) -> dict[str, Any]:
    # The file name has a hyphen, so it is read by path, not imported.
    schedule: dict[str, Any] = runpy.run_path(str(path))["SCHEDULE"]
    return schedule


def make_celery() -> Celery:
    try:
        # `celery -A recovery` starts here without the CLI's own check.
        settings = get_settings()
        preflight.check(settings)
    except ConfigError as exc:
        print(explain(exc), file=sys.stderr)
        sys.exit(2)
    app = Celery("recovery", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_default_queue="recovery",
        # Webhook deliveries and their dispatch have a queue and workers of
        # their own: an endpoint that hangs delays no retry and no email.
        task_routes={name: {"queue": WEBHOOKS_QUEUE} for name in WEBHOOK_TASKS},
        enable_utc=True,
        timezone="UTC",
        # A task is acknowledged only when it finished, so a worker killed
        # mid-task leaves it to be redelivered; every task is idempotent
        # (events are claimed in the database), so a redelivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacknowledged message after the visibility
        # timeout. Celery's docs warn that ETA/countdown tasks longer than it
        # are then delivered twice; we send no such tasks (due work lives in
        # Postgres and is claimed by the relay and dispatcher), so one hour,
        # far above any task's run time, only bounds how long a message lost
        # with a dead worker waits.
        broker_transport_options=(
            {"visibility_timeout": 3600} if settings.broker_url.startswith("redis") else {}
        ),
        broker_connection_retry_on_startup=True,
        beat_schedule=load_beat_schedule(),
        beat_schedule_filename="var/celerybeat-state",
        worker_hijack_root_logger=False,
        # Our handler writes to the real stderr; Celery's redirection would
        # send it back through logging.
        worker_redirect_stdouts=False,
    )
    return app


app = make_celery()


@setup_logging.connect
def _one_logging_configuration(**_kwargs: Any) -> None:
    # Connected, this stops Celery from installing its own handlers: its
    # records go through ours (scrubbed, JSON in production).
    configure(get_settings())


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs: Any) -> None:
    # A forked child must not share the parent's pooled database sockets.
    # (Logging and Sentry, configured in the parent before the pool starts,
    # carry over: Sentry restarts its sender in the child.)
    reset_engine()


def _now() -> datetime:
    return clock.now()


@app.task(name="recovery.process_events")
def process_events(event_ids: list[int]) -> None:
    scheduler.process_events(event_ids, _now(), get_settings())
    # Steps the events made due now (a card update's retry, a first email)
    # and the emails they queued (the thank-you of a case that closed) go at
    # once rather than at the next dispatch tick.
    steps.dispatch(_now(), get_settings(), publish_step_batch)
    outbox.dispatch(_now(), publish_messages)
    deliveries.dispatch(_now(), publish_deliveries)


def publish_event_batch(event_ids: list[int]) -> None:
    # No publish retries: when the broker is down the relay leaves the rows
    # pending and the next sweep sends them.
    process_events.apply_async(args=[event_ids], retry=False)


# Set in the broker's own memory: gone, the broker restarted and lost the
# messages it held.
BROKER_MARK = "recovery:broker-remembers"


def _broker_forgot(broker_url: str) -> bool:
    if not broker_url.startswith(("redis://", "rediss://")):
        return False
    import redis

    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=2)
        return bool(client.set(BROKER_MARK, "1", nx=True))
    except redis.RedisError:
        return False  # down: nothing is published now, and the next sweep asks again


@app.task(name="recovery.relay_inbox")
def relay_inbox() -> int:
    settings = get_settings()
    if _broker_forgot(settings.broker_url):
        relay.republish_lost(_now())
    return relay.relay(publish_event_batch, _now(), settings.relay_batch_size)


@app.task(name="recovery.execute_steps")
def execute_steps(claims: list[list[int]]) -> None:
    scheduler.execute_all([(step_id, claim) for step_id, claim in claims], _now(), get_settings())
    # The thank-you of a case a retry recovered goes now, not at the next
    # tick, and so does what the business hears of it.
    outbox.dispatch(_now(), publish_messages)
    deliveries.dispatch(_now(), publish_deliveries)


def publish_step_batch(claims: list[steps.Claim]) -> None:
    # A failed publish leaves the steps claimed; they are claimed again when
    # their lease runs out.
    for start in range(0, len(claims), STEP_CHUNK):
        execute_steps.apply_async(args=[claims[start : start + STEP_CHUNK]], retry=False)


@app.task(name="recovery.dispatch_steps")
def dispatch_steps() -> int:
    return steps.dispatch(_now(), get_settings(), publish_step_batch)


@app.task(name="recovery.send_messages")
def send_messages(message_ids: list[int]) -> None:
    delivery.send_all(message_ids, _now(), get_settings())


def publish_messages(message_ids: list[int]) -> None:
    # A failed publish leaves the emails claimed; their lease returns them.
    for start in range(0, len(message_ids), STEP_CHUNK):
        send_messages.apply_async(args=[message_ids[start : start + STEP_CHUNK]], retry=False)


@app.task(name="recovery.dispatch_outbox")
def dispatch_outbox() -> int:
    outbox.release_lapsed(_now())
    return outbox.dispatch(_now(), publish_messages)


@app.task(name="recovery.send_deliveries")
def send_deliveries(endpoint_id: int, delivery_ids: list[int]) -> None:
    deliveries.send(deliveries.Batch(endpoint_id, delivery_ids), get_settings())


def publish_deliveries(batch: deliveries.Batch) -> None:
    # A failed publish leaves the deliveries claimed; their lease returns them.
    send_deliveries.apply_async(args=[batch.endpoint_id, batch.delivery_ids], retry=False)


@app.task(name="recovery.dispatch_deliveries")
def dispatch_deliveries() -> int:
    return deliveries.dispatch(_now(), publish_deliveries)


@app.task(name="recovery.check_alerts")
def check_alerts() -> int:
    return len(alerts.check(_now(), get_settings(), key_works))


@app.task(name="recovery.alert_digest")
def alert_digest() -> None:
    alerts.digest(_now(), get_settings())


@app.task(name="recovery.send_texts")
def send_texts() -> int:
    return len(texting.send_due(_now(), get_settings()))
