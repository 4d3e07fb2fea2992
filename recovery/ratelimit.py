"""Budgets of Stripe requests per second (writes, and reads), shared by every worker.

A token bucket in Redis, updated by one Lua script so concurrent workers never
overdraw it. The bucket holds only a fifth of a second of tokens: a backlog is
paced at the configured rate rather than sent in bursts, so requests that reach
Stripe late and bunched (network and scheduling jitter) still fit its own
one-second bucket and draw no 429s, while the small burst absorbs the time a
waiting worker takes to wake up, keeping the rate close to the limit. Without
Redis (the embedded default: one worker process) the same bucket lives in
memory.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache

import redis

from recovery.config import get_settings

KEY = "recovery:ratelimit:stripe-writes"
READ_KEY = "recovery:ratelimit:stripe-reads"
BURST_SECONDS = 0.2


def capacity(rate: float) -> float:
    return max(1.0, rate * BURST_SECONDS)


# Returns 0 when a token was taken, else the milliseconds until one is due.
_TAKE = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now_ms
tokens = math.min(capacity, tokens + (now_ms - at) * rate / 1000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], 60000)
return wait
"""


class RedisBucket:
    def __init__(
        self, client: redis.Redis, rate: float, key: str = KEY, burst: float | None = None
    ):
        self.rate = rate
        self.capacity = burst if burst is not None else capacity(rate)
        self.key = key
        self._take = client.register_script(_TAKE)

    def try_take(self) -> float:
        """0 if a token was taken, else seconds to wait before asking again."""
        return int(self._take(keys=[self.key], args=[self.rate, self.capacity])) / 1000


class LocalBucket:
    """The same bucket in this process's memory; `burst` tokens at most."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.capacity = burst if burst is not None else capacity(rate)
        self._tokens = self.capacity
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def try_take(self) -> float:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate


def acquire(bucket: RedisBucket | LocalBucket | None = None) -> float:
    """Block until a request may go to Stripe (a write, unless another bucket
    is named); returns the seconds waited."""
    bucket = bucket or shared_bucket()
    waited = 0.0
    while (wait := bucket.try_take()) > 0:
        time.sleep(wait)
        waited += wait
    return waited


@lru_cache(maxsize=1)
def shared_bucket() -> RedisBucket | LocalBucket:
    settings = get_settings()
    return _bucket(settings.broker_url, settings.stripe_write_rate, KEY)


@lru_cache(maxsize=1)
def read_bucket() -> RedisBucket | LocalBucket:
    """The budget of Stripe reads (an invoice read before each reminder and
    each charge, decline details), apart from the writes': Stripe limits each
    endpoint to 25 requests a second, and a backlog of due steps must not
    spend it all on reads."""
    settings = get_settings()
    return _bucket(settings.broker_url, settings.stripe_read_rate, READ_KEY)


def _bucket(broker_url: str, rate: float, key: str) -> RedisBucket | LocalBucket:
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisBucket(redis.Redis.from_url(broker_url), rate, key)
    return LocalBucket(rate)
