"""Due steps claimed concurrently on PostgreSQL: each exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select

from recovery.config import get_settings
from recovery.db import get_engine, session_scope
from recovery.engine import scheduler, steps
from recovery.models import RecoveryAttempt, RecoveryCase

NOW = datetime(2026, 11, 2, 12, tzinfo=UTC)


def make_steps(count: int) -> None:
    with get_engine().begin() as conn:
        case_id = conn.execute(
            insert(RecoveryCase)
            .values(
                invoice_id="in_load",
                status="open",
                livemode=False,
                amount_due=1000,
                currency="usd",
                attempt_count=0,
                needs_authentication=False,
                opened_at=NOW,
                updated_at=NOW,
            )
            .returning(RecoveryCase.id)
        ).scalar_one()
        conn.execute(
            insert(RecoveryAttempt),
            [
                {
                    "case_id": case_id,
                    "kind": "email",
                    "step": f"email:load:{n}",
                    "status": "scheduled",
                    "due_at": NOW - timedelta(seconds=n % 600),
                    "claims": 0,
                    "tries": 0,
                    "idempotency_key": f"load-{n}",
                    "created_at": NOW,
                }
                for n in range(count)
            ],
        )


def test_four_claimers_and_two_beats_take_each_step_exactly_once(db):
    make_steps(10_000)
    settings = get_settings()
    claimed: list[int] = []
    lock = threading.Lock()
    lease = timedelta(minutes=5)
    errors: list[BaseException] = []

    def record(batch):
        with lock:
            claimed.extend(step_id for step_id, _ in batch)

    def claimer():
        try:
            while batch := steps.claim_due(NOW, 97, lease):
                record(batch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def beat():
        try:
            for _ in range(5):
                steps.dispatch(NOW, settings, record)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    threads += [threading.Thread(target=beat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    counts = Counter(claimed)
    assert len(counts) == 10_000 and set(counts.values()) == {1}


def test_a_stale_claim_does_nothing_and_a_lapsed_lease_is_claimed_again(db):
    make_steps(1)
    lease = timedelta(minutes=5)
    [(step_id, first)] = steps.claim_due(NOW, 10, lease)
    assert steps.claim_due(NOW, 10, lease) == []  # leased
    [(same, second)] = steps.claim_due(NOW + lease + timedelta(seconds=1), 10, lease)
    assert same == step_id and second == first + 1
    later = NOW + lease + timedelta(seconds=2)
    assert scheduler.execute((step_id, first), later, get_settings()) is None  # the old claim
    with session_scope() as session:
        assert session.scalar(select(RecoveryAttempt.status)) == "claimed"
