"""Webhook deliveries on real Celery workers (Redis, PostgreSQL): an endpoint
that hangs holds one slot of the webhooks queue, while another endpoint gets
its 200 events and the engine's retries run on the recovery queue."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

from sqlalchemy import func, select, update

from recovery import clock
from recovery.business import announce
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.models import Delivery, DeliveryStatus, RecoveryAttempt, RecoveryCase

from .business_app import BusinessApp, start
from .factories import make_case, sim_post
from .test_worker_e2e import start_worker, stop, wait_for, worker_env

EVENTS = 200


def add_endpoint(app: BusinessApp) -> None:
    from click.testing import CliRunner

    from recovery.cli import cli

    result = CliRunner().invoke(cli, ["endpoints", "add", app.url])
    assert result.exit_code == 0, result.output
    app.secrets.append(result.output.split()[-1])


def test_a_hanging_endpoint_delays_no_other_endpoint_and_no_retry(
    db, sim, receiver, flushed_redis, tmp_path, monkeypatch
):
    clock.set_now(None)
    monkeypatch.setenv("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
    get_settings.cache_clear()
    hanging, healthy = BusinessApp(hang=10.0), BusinessApp()
    servers = [start(hanging), start(healthy)]
    add_endpoint(hanging)
    add_endpoint(healthy)
    sim_post(
        sim.url,
        "/_sim/webhook_endpoints",
        {"url": f"{receiver}/webhooks/stripe", "secret": "whsec_test_current"},
    )
    allow = {"OUTBOUND_ALLOWED_NETWORKS": "127.0.0.0/8"}
    engine = start_worker(db, flushed_redis, sim.url, tmp_path, "--beat", **allow)
    webhooks = subprocess.Popen(
        [sys.executable, "-m", "recovery", "worker", "--queue", "webhooks", "--concurrency", "4"],
        env={**worker_env(db, flushed_redis, sim.url), **allow},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        scenario = sim_post(
            sim.url,
            "/_sim/scenarios/failed_invoice",
            {"behavior": {"decline_code": "insufficient_funds"}},
        )

        def opened() -> RecoveryCase | None:
            with session_scope() as session:
                return session.scalars(
                    select(RecoveryCase).where(RecoveryCase.invoice_id == scenario["invoice"])
                ).one_or_none()

        wait_for(opened, 60)
        with session_scope() as session:
            case = make_case(session)
            for _ in range(EVENTS):
                announce.case_event(session, case, announce.PAUSED, clock.now())
        # Wait for the hanging endpoint to be hung on, then make a retry due.
        wait_for(lambda: hanging.attempts or _in_flight_to_hanging(), 60)
        with session_scope() as session:
            session.execute(
                update(RecoveryAttempt)
                .where(RecoveryAttempt.kind == "retry", RecoveryAttempt.status == "scheduled")
                .values(due_at=datetime.now(UTC))
            )
        subprocess.run(
            [sys.executable, "-m", "recovery", "tick"],
            env={**worker_env(db, flushed_redis, sim.url), **allow},
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

        def retried() -> bool:
            with session_scope() as session:
                return bool(
                    session.scalar(
                        select(func.count())
                        .select_from(RecoveryAttempt)
                        .where(RecoveryAttempt.kind == "retry", RecoveryAttempt.status == "done")
                    )
                )

        # Ceilings far above what either takes, far below what waiting behind
        # the hanging endpoint would (10 s per event, 2,000 s for 200).
        wait_for(retried, 120)
        wait_for(lambda: len(healthy.accepted()) >= EVENTS + 1, 120)
        # Meanwhile the hanging endpoint was tried a few times, one at a time.
        assert len(hanging.attempts) < 20
        with session_scope() as session:
            waiting = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.status != DeliveryStatus.DELIVERED, Delivery.endpoint_id == 1)
            )
        assert waiting > EVENTS / 2
        assert all(r.verified_by for r in healthy.accepted().values())
    finally:
        errors = stop(webhooks) + stop(engine)
        for server in servers:
            server.shutdown()
            server.server_close()
        monkeypatch.delenv("OUTBOUND_ALLOWED_NETWORKS")
        get_settings.cache_clear()
    assert "Traceback" not in errors, errors[-3000:]


def _in_flight_to_hanging() -> bool:
    with session_scope() as session:
        return bool(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.endpoint_id == 1, Delivery.status == DeliveryStatus.CLAIMED)
            )
        )
