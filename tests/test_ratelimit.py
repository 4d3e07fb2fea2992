"""The shared Stripe budgets: concurrent takers never overdraw them, reads spend their own."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from recovery import ratelimit


def hammer(bucket, threads: int, seconds: float) -> tuple[int, float]:
    """Take tokens from several threads for `seconds`; (tokens taken, elapsed)."""
    taken = []
    stop = time.monotonic() + seconds

    def take() -> None:
        count = 0
        while time.monotonic() < stop:
            ratelimit.acquire(bucket)
            count += 1
        taken.append(count)

    started = time.monotonic()
    workers = [threading.Thread(target=take) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(taken), time.monotonic() - started


@pytest.fixture
def redis_bucket(redis_url):
    client = redis.Redis.from_url(redis_url)
    key = "recovery:test:bucket"
    client.delete(key)
    yield ratelimit.RedisBucket(client, rate=40, key=key)
    client.delete(key)


def test_redis_bucket_shared_by_threads_never_exceeds_its_rate(redis_bucket):
    taken, elapsed = hammer(redis_bucket, threads=6, seconds=1.5)
    # The budget over the run: the small starting burst plus the rate; every
    # taker past it would be a 429 from Stripe.
    assert taken <= ratelimit.capacity(40) + 40 * elapsed + 1
    assert taken >= 40  # takers were served, not starved


def test_local_bucket_never_exceeds_its_rate():
    bucket = ratelimit.LocalBucket(rate=40)
    taken, elapsed = hammer(bucket, threads=4, seconds=1.5)
    assert ratelimit.capacity(40) + 40 * elapsed + 1 >= taken >= 40


def test_burst_is_a_fifth_of_a_second_and_at_least_one_token():
    assert ratelimit.capacity(20) == 4
    assert ratelimit.capacity(2) == 1


@pytest.fixture
def one_read_a_second(monkeypatch):
    from recovery import stripe_api
    from recovery.config import get_settings

    def rebuild() -> None:
        get_settings.cache_clear()
        stripe_api.client.cache_clear()
        ratelimit.read_bucket.cache_clear()
        ratelimit.shared_bucket.cache_clear()

    monkeypatch.setenv("STRIPE_READ_RATE", "1")
    monkeypatch.setenv("BROKER_URL", "memory://")
    rebuild()
    yield
    monkeypatch.undo()
    rebuild()


def test_stripe_reads_draw_from_their_own_budget(sim, one_read_a_second):
    from recovery import stripe_api

    customer = sim.control("POST", "/_sim/customers", {"card": {}})[1]
    invoice = sim.control("POST", "/_sim/invoices", {"customer": customer["id"], "amount": 900})[1]
    for _ in range(2):  # the second waits for the budget to refill
        assert stripe_api.retrieve_invoice(invoice["id"])["id"] == invoice["id"]
    assert ratelimit.read_bucket().try_take() > 0  # spent by the reads
    assert ratelimit.shared_bucket().try_take() == 0  # the writes' budget untouched
