"""End to end: a real Celery worker (with beat) on real Redis and PostgreSQL.

Stripe (the simulator) declines a renewal and sends the signed webhook over
HTTP; the receiver stores it; beat's relay hands it to the worker, which asks
Stripe for the decline and opens the case.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy import select, update

from recovery import clock
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import scheduler
from recovery.inbox import relay
from recovery.models import RecoveryAttempt, RecoveryCase, WebhookEvent

from .conftest import BASE_ENV, ROOT, free_port, reload_settings
from .factories import post_event, sim_post, stripe_event


def wait_for(predicate, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {seconds}s")


def case_status(invoice_id: str) -> str | None:
    with session_scope() as session:
        case = session.scalars(
            select(RecoveryCase).where(RecoveryCase.invoice_id == invoice_id)
        ).one_or_none()
        return case.status if case else None


def worker_env(db_url: str, broker_url: str, sim_url: str) -> dict[str, str]:
    return {
        **os.environ,
        **BASE_ENV,
        "DATABASE_URL": db_url,
        "BROKER_URL": broker_url,
        "STRIPE_API_BASE": sim_url,
        "PYTHONPATH": str(ROOT),
    }


def start_worker(
    db_url: str, broker_url: str, sim_url: str, tmp_path, *options: str, **extra_env: str
) -> subprocess.Popen:
    env = {**worker_env(db_url, broker_url, sim_url), **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "recovery", "worker", "--concurrency", "2", *options],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err.decode(errors="replace")


def test_signed_event_over_http_opens_case_then_late_failure_keeps_it_closed(
    db, sim, receiver, flushed_redis, tmp_path
):
    sim_post(
        sim.url,
        "/_sim/webhook_endpoints",
        {"url": f"{receiver}/webhooks/stripe", "secret": "whsec_test_current"},
    )
    metrics_port = free_port()
    counts = tmp_path / "metrics"
    counts.mkdir()
    worker = start_worker(
        db,
        flushed_redis,
        sim.url,
        tmp_path,
        "--beat",
        "--metrics-port",
        str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(counts),
    )
    try:
        scenario = sim_post(
            sim.url,
            "/_sim/scenarios/failed_invoice",
            {
                "card": {"brand": "visa", "fingerprint": "fpE2E"},
                "behavior": {"decline_code": "do_not_honor", "network_decline_code": "05"},
            },
        )
        invoice_id = scenario["invoice"]
        try:
            wait_for(lambda: case_status(invoice_id) == "open")
        except AssertionError:
            with session_scope() as session:
                stored = [(e.type, e.status) for e in session.scalars(select(WebhookEvent))]
            raise AssertionError(f"no open case; events stored: {stored}") from None
        # The prefork child that asked Stripe counted it; the worker serves the sum.
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=10).read()
        assert re.search(
            rb'recovery_stripe_requests_total\{method="get",status="200"\} [1-9]', scraped
        ), scraped.decode()[-2000:]
        with session_scope() as session:
            case = session.scalars(select(RecoveryCase)).one()
            assert (case.decline_code, case.network_decline_code, case.card_fingerprint) == (
                "do_not_honor",
                "05",
                "fpE2E",
            )
        failed = next(e for e in sim.state.events if e["type"] == "invoice.payment_failed")

        # Paid, then the old failure arrives again: the case stays recovered.
        sim_post(sim.url, f"/_sim/customers/{scenario['customer']}/cards", {})
        sim_post(sim.url, f"/_sim/invoices/{invoice_id}/attempt")
        wait_for(lambda: case_status(invoice_id) == "recovered")
        late = stripe_event(
            "invoice.payment_failed", failed["data"]["object"], created=failed["created"]
        )
        assert post_event(receiver, late)[0] == 200

        def late_event_done():
            with session_scope() as session:
                row = session.scalars(
                    select(WebhookEvent).where(WebhookEvent.stripe_event_id == late["id"])
                ).one()
                return row.status == "processed"

        wait_for(late_event_done)
        assert case_status(invoice_id) == "recovered"
    finally:
        errors = stop(worker)
    assert "Traceback" not in errors, errors[-3000:]


def test_broker_down_events_wait_then_flow_when_it_returns(
    db, sim, receiver, private_redis, tmp_path
):
    """The receiver answers 2xx while Redis is down; the sweep delivers afterwards."""
    reload_settings(DATABASE_URL=db, BROKER_URL=private_redis.url, STRIPE_API_BASE=sim.url)
    # recovery.tasks builds its Celery app from the settings when first imported.
    from recovery.tasks import make_celery

    app = make_celery()
    app.conf.broker_connection_timeout = 1

    def publish(ids):
        app.send_task("recovery.process_events", args=[ids], retry=False)

    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    failed = next(e for e in sim.state.events if e["type"] == "invoice.payment_failed")
    # Redis is not running: the event is still acknowledged and stored.
    assert post_event(receiver, failed)[0] == 200
    assert relay.relay(publish, datetime.now(UTC), 100) == 0
    with session_scope() as session:
        row = session.scalars(select(WebhookEvent)).one()
        assert (row.status, row.enqueued_at) == ("pending", None)

    # Redis is back: beat's periodic sweep, in the worker, relays the event.
    private_redis.start()
    worker = start_worker(db, private_redis.url, sim.url, tmp_path, "--beat")
    try:
        wait_for(lambda: case_status(scenario["invoice"]) == "open")
    finally:
        stop(worker)


def test_celery_worker_killed_mid_retry_completes_later_with_one_charge(
    db, sim, receiver, flushed_redis, tmp_path
):
    """SIGKILL a real worker while Stripe holds the pay answer; after the lease a
    second worker takes the step again, asks Stripe first and charges nothing."""
    clock.set_now(None)
    sim_post(
        sim.url,
        "/_sim/webhook_endpoints",
        {"url": f"{receiver}/webhooks/stripe", "secret": "whsec_test_current"},
    )
    scenario = sim_post(
        sim.url,
        "/_sim/scenarios/failed_invoice",
        {"behavior": {"decline_code": "processing_error", "succeed_after": int(time.time()) + 2}},
    )
    invoice_id = scenario["invoice"]
    scenario_pays_from = time.time() + 2
    sim.flush()
    scheduler.run_pass(get_settings(), sync=True)
    with session_scope() as session:
        case = session.scalars(select(RecoveryCase)).one()
        # The plan's first retry comes due now.
        session.execute(
            update(RecoveryAttempt)
            .where(RecoveryAttempt.case_id == case.id, RecoveryAttempt.step == "retry:1")
            .values(due_at=datetime.now(UTC))
        )
        case_id = case.id
    sim_post(
        sim.url,
        "/_sim/faults",
        {
            "path_prefix": f"/v1/invoices/{invoice_id}/pay",
            "status": "timeout",
            "when": "after",
            "delay": 60,
            "count": 1,
        },
    )
    lease = 5
    broker = Celery(broker=flushed_redis)

    def start(log) -> subprocess.Popen:
        env = {
            **os.environ,
            **BASE_ENV,
            "DATABASE_URL": db,
            "BROKER_URL": flushed_redis,
            "STRIPE_API_BASE": sim.url,
            "STEP_LEASE_SECONDS": str(lease),
            "PYTHONPATH": str(ROOT),
        }
        return subprocess.Popen(
            [sys.executable, "-m", "recovery", "worker", "--concurrency", "1"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group, so SIGKILL reaches the pool child too.
            start_new_session=True,
        )

    def charges() -> list:
        return [c for c in sim.state.charges if c[0] == invoice_id]

    def retry_step() -> RecoveryAttempt:
        with session_scope() as session:
            return session.scalars(
                select(RecoveryAttempt).where(
                    RecoveryAttempt.case_id == case_id, RecoveryAttempt.step == "retry:1"
                )
            ).one()

    with open(tmp_path / "workers.log", "wb") as log:
        first = start(log)
        time.sleep(max(0.0, scenario_pays_from - time.time()))
        try:
            broker.send_task("recovery.dispatch_steps", queue="recovery")
            wait_for(charges, seconds=60)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        assert retry_step().status == "executing"
        assert case_status(invoice_id) == "open"

        time.sleep(lease + 1)
        second = start(log)
        try:
            broker.send_task("recovery.dispatch_steps", queue="recovery")
            wait_for(lambda: case_status(invoice_id) == "recovered", seconds=60)
        finally:
            second.terminate()
            second.wait(timeout=20)
    step = retry_step()
    assert (step.status, step.claims) == ("done", 2)
    assert len(charges()) == 1
    with session_scope() as session:
        case = session.get(RecoveryCase, case_id)
        # The charge the dead worker made is credited to that retry.
        assert (case.recovery_path, case.recovered_by_step) == ("retry", "retry:1")


def test_celery_users_tools_find_the_app_and_see_the_workers_tasks(db, flushed_redis, tmp_path):
    """`celery -A recovery` reaches a running worker, and `recovery worker
    --events` sends the task events Flower and `celery events` show."""
    env = worker_env(db, flushed_redis, "http://127.0.0.1:9")
    worker = start_worker(db, flushed_redis, "http://127.0.0.1:9", tmp_path, "--events")
    dump = tmp_path / "events.txt"
    with dump.open("w") as out:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "recovery", "events", "--dump"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def pinged() -> bool:
            answer = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "recovery", "inspect", "ping"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            return answer.returncode == 0 and "pong" in answer.stdout

        wait_for(pinged, 60)
        sender = Celery(broker=flushed_redis)

        def task_event_seen() -> bool:
            sender.send_task("recovery.dispatch_steps", queue="recovery")
            text = dump.read_text()
            return "task succeeded" in text and "recovery.dispatch_steps" in text

        wait_for(task_event_seen, 60)
    finally:
        watcher.terminate()
        watcher.wait(20)
        errors = stop(worker)
    assert "Traceback" not in errors, errors[-3000:]


def test_events_redis_lost_when_it_died_go_out_again_within_seconds(
    db, sim, receiver, private_redis, tmp_path
):
    """Published to Redis, then Redis restarts empty: the events are handed
    out again as soon as it is back, not when their five-minute lease ends."""
    private_redis.start()
    reload_settings(DATABASE_URL=db, BROKER_URL=private_redis.url, STRIPE_API_BASE=sim.url)
    from recovery.tasks import make_celery

    app = make_celery()

    def publish(ids):
        app.send_task("recovery.process_events", args=[ids], retry=False)

    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {})
    failed = next(e for e in sim.state.events if e["type"] == "invoice.payment_failed")
    assert post_event(receiver, failed)[0] == 200
    # Published, with no worker to take it yet; then Redis dies with it.
    assert relay.relay(publish, datetime.now(UTC), 100) == 1
    with session_scope() as session:
        assert session.scalars(select(WebhookEvent.enqueued_at)).one() is not None
    private_redis.stop()
    private_redis.start()
    started = time.monotonic()
    worker = start_worker(db, private_redis.url, sim.url, tmp_path, "--beat")
    try:
        # Far below the five-minute lease a lost message used to wait for.
        wait_for(lambda: case_status(scenario["invoice"]) == "open", 120)
    finally:
        errors = stop(worker)
    assert time.monotonic() - started < relay.LEASE.total_seconds() / 2
    assert "Traceback" not in errors, errors[-2000:]
    with session_scope() as session:
        assert session.scalars(select(RecoveryCase)).one().invoice_id == scenario["invoice"]
