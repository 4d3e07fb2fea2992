"""Card-network retry limits, per card. Pure; the attempts come from the
`card_attempts` table (ours and Stripe's own).

Visa allows 15 reattempts of a declined transaction in 30 days (acquirers
report the cap rising to 20; configurable), Mastercard 35 in 30 days and 10 in
24 hours; after a stop code (a dead card, Visa category 1, Mastercard 03/21,
advice "do not try again") no network allows another attempt. Counting every
attempt, the first included, keeps us on the safe side of each rule. Other
brands get Visa's limits, the stricter of the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Window:
    length: timedelta
    max_attempts: int


def limits(brand: str | None, visa_max_30d: int = 15) -> tuple[Window, ...]:
    if (brand or "").lower() == "mastercard":
        return (Window(timedelta(days=30), 35), Window(timedelta(hours=24), 10))
    return (Window(timedelta(days=30), visa_max_30d),)


def earliest_allowed(
    attempts: Iterable[datetime],
    windows: tuple[Window, ...],
    at: datetime,
    stopped: bool = False,
) -> datetime | None:
    """The first instant ≥ `at` when one more attempt keeps every window within
    its limit; None when the card may never be tried again."""
    if stopped:
        return None
    times = sorted(attempts)
    moment = at
    if any(window.max_attempts <= 0 for window in windows):
        return None
    # Each pass moves `moment` to where every window has room; attempts already
    # recorded after `at` can refill a window, so repeat until nothing moves.
    while True:
        moved = moment
        for window in windows:
            inside = [t for t in times if moved - window.length < t <= moved]
            if len(inside) >= window.max_attempts:
                # The attempt that must leave the window for one more to fit.
                leaving = inside[len(inside) - window.max_attempts]
                moved = max(moved, leaving + window.length)
        if moved == moment:
            return moment
        moment = moved


def within_limits(attempts: Iterable[datetime], windows: tuple[Window, ...]) -> bool:
    """Whether every window of every length holds at most its limit (for tests)."""
    times = sorted(attempts)
    for window in windows:
        start = 0
        for end, moment in enumerate(times):
            while times[start] <= moment - window.length:
                start += 1
            if end - start + 1 > window.max_attempts:
                return False
    return True
