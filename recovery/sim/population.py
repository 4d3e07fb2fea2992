"""Synthetic subscribers whose renewals fail: who, why, and what they do about it.

The demo, the backtest and `recovery simulate` draw from this. The mix is an
assumption, stated here so it can be argued with, not a measurement. The
engine never reads it: it meets these people only through Stripe's answers
to its charges and their clicks on its links.

* **Causes.** Soft declines dominate, insufficient funds first; card issues
  that need the customer (expired, wrong details) come next; authentication,
  dead cards and fraud are a small tail. This is the order processors'
  decline-code documentation (Stripe's "Decline codes" page) and dunning
  vendors' public reports on involuntary churn describe; the weights are ours.
* **Insufficient funds waits for pay.** Each such customer is paid on a
  schedule drawn from the shares of US private businesses by length of pay
  period (Bureau of Labor Statistics, Current Employment Statistics, March
  2013, "How frequently do private businesses pay workers?", The Economics
  Daily, 2014-06-05: weekly 32.4%, biweekly 36.5%, semimonthly 19.8%,
  monthly 11.3%). Weekly and biweekly pay lands on Fridays, semimonthly on the
  15th and the last business day, monthly on the last business day, each
  moved to the business day before when it falls on a weekend. The money is
  there from the payday morning for one to four days; each payday covers the
  renewal with a chance drawn per customer, and some customers' pay never
  does. Outside those windows the card declines again.
* **Opaque declines are a coin the issuer tosses.** `generic_decline` and
  `do_not_honor` cards that recover at all are approved on each attempt from
  some day on with a fixed chance, so both when and how often one tries count.
* **Other soft declines clear.** A processing error or a velocity limit
  clears after hours or days, and the card then keeps working.
* **Only a new card recovers the rest.** Expired, wrong-detail and dead cards
  never work again; authentication needs the customer on the page.
* **Some keep another card.** A quarter of customers have a second card saved
  on their Stripe customer, unexpired nine times in ten, approved seven
  times in ten. Ours: no public figure counts saved cards; FlyCode reports
  +14% recovery from trying them.
* **Customers read some mail.** They open about half the emails they get and
  act on a fraction of those, hours to a day later. Set your own from
  `recovery stats --json` (emails, clicks, recoveries) once you have data.
* **Some can be reached elsewhere.** Four in ten gave a phone and consent to
  SMS (ours: consumer subscriptions ask for the phone at checkout, fewer
  record consent). SMS are read far more than email (the widely quoted
  figure is 98% read; we take 90%) and a fifth of those read are tapped
  (ours; SMS marketing benchmarks put click rates between 10% and 30%).
  Six in ten use the business's app in a given week, three visits a week on
  average, the rest not at all while the payment is due (ours); a visit
  that shows the notice is acted on a quarter of the time (ours: Churnkey
  reports 57-83% of failed payments recovered where an in-app wall backs
  email, against the bottom of that range for email alone). These traits
  are drawn from a generator of their own per subscriber, so adding them
  left every earlier population as it was.

Everything is drawn from one seeded random generator, so a seed names a
population exactly.
"""

from __future__ import annotations

import calendar
import random
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta


@dataclass(frozen=True)
class Cause:
    name: str
    weight: float
    behaviour: dict  # how the simulated issuer declines (the simulator's card behaviour)
    recovers: float = 0.0  # chance the same card works again at all
    within_days: tuple[float, float] = (1.0, 10.0)  # from when, if it does
    # How it works again: "clears" (for good), "coin" (each attempt approved
    # with APPROVE_CHANCE), "payday" (in the days after a covering payday).
    recovery: str = "clears"


CAUSES: tuple[Cause, ...] = (
    Cause(
        "insufficient_funds", 0.36, {"decline_code": "insufficient_funds"}, 0.7, recovery="payday"
    ),
    Cause("generic_decline", 0.15, {"decline_code": "generic_decline"}, 0.5, (1, 21), "coin"),
    Cause("do_not_honor", 0.09, {"decline_code": "do_not_honor"}, 0.45, (1, 21), "coin"),
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
# BLS CES, March 2013 (see the module's docstring).
PAY_SCHEDULES = (("weekly", 32.4), ("biweekly", 36.5), ("semimonthly", 19.8), ("monthly", 11.3))
APPROVE_CHANCE = 0.3  # an opaque decline's card, once it can be approved at all
PAYDAY_COVERS = (0.4, 0.9)  # the chance one payday covers the renewal, per customer
FUNDS_LAST_DAYS = (1.0, 4.0)  # how long the money stays after a covering payday
DEPOSIT_HOUR = 6  # UTC: direct deposits are there before the working day
HORIZON_DAYS = 150  # how far ahead a card's truth is drawn
OTHER_CARD = 0.25  # has another card saved
OTHER_CARD_EXPIRED = 0.1
OTHER_CARD_APPROVES = 0.7


@dataclass(frozen=True)
class Habits:
    opens: float = 0.5  # opens an email
    clicks: float = 0.35  # clicks its link, once opened
    completes: float = 0.7  # finishes on Stripe's page (saves a card, authenticates)
    pays_now: float = 0.5  # offered both, pays now rather than saving a card
    delay_hours: tuple[float, float] = (0.5, 30.0)
    reads_sms: float = 0.9
    taps_sms: float = 0.2  # taps the link of an SMS read
    acts_on_notice: float = 0.25  # acts on the notice seen on a visit


@dataclass(frozen=True)
class CardTruth:
    """When the declined card would be approved: the population's secret."""

    works_from: datetime | None = None  # approved from then on ("clears")
    approve_chance: float | None = None  # from works_from, per attempt ("coin")
    funded: tuple[tuple[datetime, datetime], ...] = ()  # approved inside these ("payday")
    draws: str = ""  # names the issuer's coin tosses

    def behaviour(self) -> dict:
        """The simulator's card behaviour for this truth."""
        found: dict = {}
        if self.works_from is not None:
            found["succeed_after"] = int(self.works_from.timestamp())
        if self.approve_chance is not None:
            found["approve_chance"] = self.approve_chance
            found["draws"] = self.draws
        if self.funded:
            found["funded"] = [[int(a.timestamp()), int(b.timestamp())] for a, b in self.funded]
        return found


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
    truth: CardTruth
    habits: Habits
    other_card: dict | None = None  # another card saved on the customer
    phone: str | None = None  # with consent to SMS, or None
    app_visits_per_week: float = 0.0

    def card(self) -> dict:
        behaviour = {"mode": "decline", **self.cause.behaviour, **self.truth.behaviour()}
        return {
            "brand": self.brand,
            "last4": f"{4000 + self.index % 6000:04d}"[-4:],
            "fingerprint": f"demo{self.index:06d}",
            "behavior": behaviour,
        }


def _pick(rng: random.Random, weighted):
    items, weights = zip(*weighted, strict=True)
    return rng.choices(items, weights=weights)[0]


def _business_day_on_or_before(day: date) -> date:
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def paydays(schedule: str, start: date, end: date, phase: int = 0) -> list[date]:
    """The days a customer on `schedule` is paid between `start` and `end`."""
    found: set[date] = set()
    if schedule in ("weekly", "biweekly"):
        friday = start + timedelta(days=(4 - start.weekday()) % 7)
        while friday <= end:
            if schedule == "weekly" or (friday.toordinal() // 7) % 2 == phase:
                found.add(friday)
            friday += timedelta(days=7)
    else:
        year, month = start.year, start.month
        while date(year, month, 1) <= end:
            last = date(year, month, calendar.monthrange(year, month)[1])
            found.add(_business_day_on_or_before(last))
            if schedule == "semimonthly":
                found.add(_business_day_on_or_before(date(year, month, 15)))
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return sorted(d for d in found if start <= d <= end)


def draw_truth(cause: Cause, fails_at: datetime, rng: random.Random, name: str) -> CardTruth:
    """Whether and when the declined card would be approved again."""
    if rng.random() >= cause.recovers:
        return CardTruth()
    if cause.recovery == "payday":
        schedule = _pick(rng, PAY_SCHEDULES)
        phase = rng.randrange(2)
        covers = rng.uniform(*PAYDAY_COVERS)
        windows = []
        # The day of the failure is not a payday that could have covered it.
        first = fails_at.date() + timedelta(days=1)
        for payday in paydays(schedule, first, first + timedelta(days=HORIZON_DAYS), phase):
            if rng.random() < covers:
                opens = datetime.combine(payday, time(DEPOSIT_HOUR), fails_at.tzinfo)
                lasts = timedelta(days=rng.uniform(*FUNDS_LAST_DAYS))
                windows.append((opens, opens + lasts))
        return CardTruth(funded=tuple(windows))
    works_from = fails_at + timedelta(days=rng.uniform(*cause.within_days))
    if cause.recovery == "coin":
        return CardTruth(works_from=works_from, approve_chance=APPROVE_CHANCE, draws=name)
    return CardTruth(works_from=works_from)


def _other_card(rng: random.Random, index: int) -> dict | None:
    if rng.random() >= OTHER_CARD:
        return None
    expired = rng.random() < OTHER_CARD_EXPIRED
    approves = rng.random() < OTHER_CARD_APPROVES
    return {
        "brand": _pick(rng, BRANDS),
        "last4": f"{(index * 7) % 10000:04d}",
        "fingerprint": f"demo{index:06d}b",
        "exp_month": 12,
        "exp_year": 2024 if expired else 2030,
        "behavior": {"mode": "succeed"}
        if approves
        else {"mode": "decline", "decline_code": "generic_decline"},
    }


def synthetic(size: int, seed: int, start: datetime, spread_days: float = 10.0) -> list[Member]:
    """`size` subscribers whose renewals fail between `start` and `spread_days` later."""
    rng = random.Random(seed)
    members = []
    for index in range(size):
        cause = _pick(rng, [(c, c.weight) for c in CAUSES])
        fails_at = start + timedelta(hours=rng.randrange(int(spread_days * 24)))
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
                truth=draw_truth(cause, fails_at, rng, f"{seed}:{index}"),
                habits=Habits(),
                other_card=_other_card(rng, index),
                **_channels(seed, index),
            )
        )
    return sorted(members, key=lambda m: (m.fails_at, m.index))


SMS_CONSENT = 0.4
USES_APP = 0.6
APP_VISITS_PER_WEEK = 3.0


def _channels(seed: int, index: int) -> dict:
    """Phone with consent, and app use: a generator of their own, so the
    rest of the population is drawn as before they existed."""
    rng = random.Random(f"{seed}:channels:{index}")
    consents, uses_app = rng.random() < SMS_CONSENT, rng.random() < USES_APP
    return {
        "phone": f"+1555{index:07d}" if consents else None,
        "app_visits_per_week": APP_VISITS_PER_WEEK if uses_app else 0.0,
    }


_FIRST = ("Ada", "Ben", "Chloé", "Dev", "Elif", "Femi", "Grace", "Hiro", "Ines", "Jonas", "Kofi")
_LAST = ("Okafor", "Schmidt", "Tanaka", "Rossi", "Novak", "Garcia", "Dubois", "Larsen", "Singh")
