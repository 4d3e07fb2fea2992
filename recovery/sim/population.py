"""Synthetic subscribers whose renewals fail: who, why, and what they do about it.

The demo and the backtest draw from this. The mix is an assumption, stated
here so it can be argued with, not a measurement:

* Soft declines dominate, insufficient funds first; card issues that need the
  customer (expired, wrong details) come next; authentication, dead cards and
  fraud are a small tail. This is the order that processors' decline-code
  documentation (Stripe's "Decline codes" page) and dunning vendors' public
  reports on involuntary churn describe; the exact weights below are ours.
* A soft-declined card tends to work again within days, often around payday;
  whether and when it does is drawn per card. Expired and dead cards never
  work again: only a new card recovers those.
* Customers open about half the emails they get and act on a fraction of
  those, hours to a day later. Again an assumption: set your own from
  `recovery stats --json` (emails → clicks → recoveries) once you have data.

Everything is drawn from one seeded random generator, so a seed names a
population exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Cause:
    name: str
    weight: float
    behaviour: dict  # how the simulated issuer declines (the simulator's card behaviour)
    recovers: float = 0.0  # chance the same card works again at all
    within_days: tuple[float, float] = (1.0, 10.0)  # when, if it does


CAUSES: tuple[Cause, ...] = (
    Cause("insufficient_funds", 0.36, {"decline_code": "insufficient_funds"}, 0.5, (2, 20)),
    Cause("generic_decline", 0.15, {"decline_code": "generic_decline"}, 0.35, (1, 10)),
    Cause("do_not_honor", 0.09, {"decline_code": "do_not_honor"}, 0.3, (1, 10)),
    Cause("processing_error", 0.04, {"decline_code": "processing_error"}, 0.95, (0.05, 1)),
    Cause("card_velocity_exceeded", 0.03, {"decline_code": "card_velocity_exceeded"}, 0.7, (1, 5)),
    Cause("expired_card", 0.13, {"decline_code": "expired_card"}),
    Cause("incorrect_cvc", 0.02, {"decline_code": "incorrect_cvc"}),
    Cause("authentication_required", 0.07, {"mode": "authenticate"}),
    Cause("stolen_card", 0.03, {"decline_code": "stolen_card"}),
    Cause("lost_card", 0.02, {"decline_code": "lost_card"}),
    Cause(
        "do_not_try_again",
        0.04,
        {"decline_code": "generic_decline", "advice_code": "do_not_try_again"},
    ),
    Cause("fraudulent", 0.02, {"decline_code": "fraudulent"}),
)
PRICES = (900, 1900, 2900, 4900, 9900)  # minor units
CURRENCIES = (("usd", 0.8), ("eur", 0.2))
BRANDS = (("visa", 0.55), ("mastercard", 0.35), ("amex", 0.10))


@dataclass(frozen=True)
class Habits:
    opens: float = 0.5  # opens an email
    clicks: float = 0.35  # clicks its link, once opened
    completes: float = 0.7  # finishes on Stripe's page (saves a card, authenticates)
    delay_hours: tuple[float, float] = (0.5, 30.0)


@dataclass(frozen=True)
class Member:
    index: int
    email: str
    name: str
    amount: int
    currency: str
    brand: str
    cause: Cause
    fails_at: datetime
    card_works_from: datetime | None  # the same card succeeds from then on
    habits: Habits

    def card(self) -> dict:
        behaviour = {"mode": "decline", **self.cause.behaviour}
        if self.card_works_from is not None:
            behaviour["succeed_after"] = int(self.card_works_from.timestamp())
        return {
            "brand": self.brand,
            "last4": f"{4000 + self.index % 6000:04d}"[-4:],
            "fingerprint": f"demo{self.index:06d}",
            "behavior": behaviour,
        }


def _pick(rng: random.Random, weighted):
    items, weights = zip(*weighted, strict=True)
    return rng.choices(items, weights=weights)[0]


def synthetic(size: int, seed: int, start: datetime, spread_days: float = 10.0) -> list[Member]:
    """`size` subscribers whose renewals fail between `start` and `spread_days` later."""
    rng = random.Random(seed)
    members = []
    for index in range(size):
        cause = _pick(rng, [(c, c.weight) for c in CAUSES])
        fails_at = start + timedelta(hours=rng.randrange(int(spread_days * 24)))
        works_from = None
        if rng.random() < cause.recovers:
            works_from = fails_at + timedelta(days=rng.uniform(*cause.within_days))
        members.append(
            Member(
                index=index,
                email=f"subscriber{index}@example.test",
                name=f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                amount=rng.choice(PRICES),
                currency=_pick(rng, CURRENCIES),
                brand=_pick(rng, BRANDS),
                cause=cause,
                fails_at=fails_at,
                card_works_from=works_from,
                habits=Habits(),
            )
        )
    return sorted(members, key=lambda m: (m.fails_at, m.index))


_FIRST = ("Ada", "Ben", "Chloé", "Dev", "Elif", "Femi", "Grace", "Hiro", "Ines", "Jonas", "Kofi")
_LAST = ("Okafor", "Schmidt", "Tanaka", "Rossi", "Novak", "Garcia", "Dubois", "Larsen", "Singh")
