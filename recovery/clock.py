"""The one clock. Every part of the product asks it for the time.

In production it is the system's UTC time. `recovery tick --now`, the demo,
backtests and tests set it to an instant, so plans run over simulated weeks in
seconds through the same code. Process-wide on purpose: a simulated instant
must hold in every thread of the pass (the webhook writer, the executors).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

_lock = threading.Lock()
_fixed: datetime | None = None


def now() -> datetime:
    fixed = _fixed
    return fixed if fixed is not None else datetime.now(UTC)


def set_now(instant: datetime | None) -> None:
    """Fix the clock at `instant` (timezone-aware), or back to real time with None."""
    global _fixed
    if instant is not None and instant.utcoffset() is None:
        raise ValueError("the clock takes timezone-aware instants only")
    with _lock:
        _fixed = instant.astimezone(UTC) if instant is not None else None


@contextmanager
def frozen_at(instant: datetime) -> Iterator[datetime]:
    previous = _fixed
    set_now(instant)
    try:
        yield now()
    finally:
        set_now(previous)


def doubling(tries: int, cap: timedelta, first: timedelta = timedelta(seconds=30)) -> timedelta:
    """The wait before try `tries + 1`: first, twice that, four times…, at most cap."""
    return min(first * 2 ** max(tries - 1, 0), cap)


def parse_instant(text: str) -> datetime:
    """An ISO 8601 instant; one without an offset is read as UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.utcoffset() is None else value.astimezone(UTC)
