"""When do retries work for this business? Learned from its own outcomes. Pure.

Every plan retry that reached the issuer is one outcome, paid or declined, in
a slot: the failure's category, how long after the failure it ran, how many
days after the last common payday and whether that payday came after the
card's last decline, and the part of the customer's day. What is believed is
held per family, the slots of one category and one place on the axis the
category's plan schedules along (Axis): a plan of paydays waits on money, so
its families are relations to a payday; a plan of offsets waits on the
issuer, so its families are spans of days since the failure. Each family is a
Beta distribution whose prior favours the family of the moment the static
plan would choose (plans.py, with its sources), moved by every outcome of the
family's slots. Families are why a business of a few hundred failures a
month learns at all: there are hundreds of slots, a handful of families.
Outcomes are kept per slot all the same, so a finer split can be read from
them later without losing what was learned.

To time a case's next retry, one chance is drawn from the Beta of each family
the allowed candidate moments fall in (Thompson sampling) and the best draw
wins: a family that has paid is chosen more, one nobody has tried is still
tried now and then, and as outcomes pile up the draws settle on what works.
On a plan of paydays a try leaves the plan's family only for one believed to
pay at least as well, and within the winning family the moment nearest the
plan's own is taken. On a plan of offsets a moment is worth the chance of
recovering the case with the plan's tries after it, and a try moves only
where that chance rises by WORTH_MOVING (choose says why).
Candidates lie between the earliest moment the case may be tried again and
last_moment: a little after the plan's payday, or, for a plan of offsets,
as late as leaves room for the plan's later tries, so that a business whose
opaque declines pay late spends its tries late. The plan's budget of tries,
its window and the networks' limits (applied by the planner afterwards)
still bound every move.

Nothing here reads the clock or a random source of its own: the caller passes
`now` and a seeded generator, so the same inputs choose the same moment.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from recovery.engine.plans import common_paydays

# The bounds of "days since the failure", in days.
SINCE_FAILURE = (1, 3, 7, 14, 21)
PARTS_OF_DAY = ((6, "night"), (12, "morning"), (18, "afternoon"), (24, "evening"))
# Candidate hours in the customer's zone: mornings and late afternoons.
CANDIDATE_HOURS = (9, 17)
# How much later than the static plan's moment a retry may go.
LATER_BY = timedelta(days=2)
# Between two plan tries of one case, unless the plan itself asks for less.
MIN_GAP = timedelta(hours=20)
# The prior: what the static plan believes, worth this many outcomes.
PRIOR_STRENGTH = 12.0
PRIOR_PLAN = 0.2  # the chance the plan's own slot is believed to have
PRIOR_OTHER = 0.1  # and any other slot
# On the time axis a try leaves the plan's moment only where that is believed
# to raise the case's chance of recovery by this much (choose): a try moved
# later makes the case wait for its money, and the draws that decide it are
# noisy. Two points halved what is left of that wait but, over 10 seeds of
# 600, also half the gain after the warm-up (measured in choose).
WORTH_MOVING = 0.01


@dataclass(frozen=True)
class Counts:
    paid: int = 0
    declined: int = 0

    @property
    def n(self) -> int:
        return self.paid + self.declined


def _since_failure(days: float) -> str:
    low = 0
    for high in SINCE_FAILURE:
        if days < high:
            return f"d{low}-{high}"
        low = high
    return f"d{low}+"


def _since_payday(day: date, declined_on: date) -> str:
    """How many days since the last common payday, and whether that payday
    came after the case's last decline ("fresh") or not ("again"): a second
    try on the money of a payday that did not cover the first is a different
    bet from a first try on it."""
    # Fridays are paydays, so there is one in any seven days.
    payday = common_paydays(day - timedelta(days=6), day)[-1]
    since = (day - payday).days
    return f"p{since if since < 3 else '3+'}/{'fresh' if declined_on < payday else 'again'}"


def _part_of_day(hour: int) -> str:
    return next(name for end, name in PARTS_OF_DAY if hour < end)


def slot_of(
    category: str, anchor: datetime, moment: datetime, zone: ZoneInfo, last_declined: datetime
) -> str:
    """The slot a retry at `moment` falls in, for a case failed at `anchor`
    whose card last declined at `last_declined`."""
    local = moment.astimezone(zone)
    days = (moment - anchor).total_seconds() / 86_400
    declined_on = last_declined.astimezone(zone).date()
    return (
        f"{category}/{_since_failure(days)}/{_since_payday(local.date(), declined_on)}"
        f"/{_part_of_day(local.hour)}"
    )


@dataclass(frozen=True)
class Belief:
    family: str
    paid: float  # the Beta's parameters: prior plus outcomes
    declined: float
    outcomes: int  # outcomes behind it, besides the prior

    @property
    def mean(self) -> float:
        return self.paid / (self.paid + self.declined)


class Axis(enum.StrEnum):
    """What a category's retries are believed to wait on: the axis its plan
    schedules along, and so the one its slots are grouped by."""

    PAYDAY = "payday"  # money, arriving with pay: a plan of paydays
    TIME = "time"  # time passing since the failure: a plan of offsets


def family_of(slot: str, axis: Axis = Axis.PAYDAY) -> str:
    """The slots that share a category and a place on the axis learn as a
    family; a family gathers outcomes many times faster than any one of its
    slots. On the payday axis the place is the relation to a payday (days
    since it, fresh or again): whether the money has come. On the time axis
    it is the span of days since the failure: whether the issuer has
    relented. A slot of another shape (stored by an earlier version) is a
    family of its own."""
    parts = slot.split("/")
    if len(parts) != 5:
        return slot
    category, since_failure, since_payday, fresh, _part_of_day = parts
    if axis is Axis.TIME:
        return f"{category}/{since_failure}"
    return f"{category}/{since_payday}/{fresh}"


def families(counts: Mapping[str, Counts], axis: Axis = Axis.PAYDAY) -> dict[str, Counts]:
    """The outcomes of each family, summed over its slots."""
    found: dict[str, Counts] = {}
    for slot, seen in counts.items():
        family = family_of(slot, axis)
        so_far = found.get(family, Counts())
        found[family] = Counts(so_far.paid + seen.paid, so_far.declined + seen.declined)
    return found


def _beta(mean: float, seen: Counts) -> tuple[float, float]:
    """A Beta's parameters: a prior of `mean`, worth PRIOR_STRENGTH outcomes,
    moved by the outcomes seen."""
    return mean * PRIOR_STRENGTH + seen.paid, (1 - mean) * PRIOR_STRENGTH + seen.declined


def family_belief(
    family: str, kin: Mapping[str, Counts], plans_family: str | None = None
) -> Belief:
    """What is believed of a family: the plan's prior for it, moved by all
    the outcomes of its slots (`kin` is `families(counts)`)."""
    seen = kin.get(family, Counts())
    prior = PRIOR_PLAN if family == plans_family else PRIOR_OTHER
    return Belief(family, *_beta(prior, seen), seen.n)


@dataclass(frozen=True)
class Choice:
    moment: datetime
    slot: str  # the slot the moment falls in, where its outcome will count
    belief: Belief  # what is believed of the slot's family, which won the draw
    drawn: float  # the chance drawn for the family
    plan_moment: datetime
    plan_slot: str
    candidates: int  # families drawn
    # A family that drew best but is believed to pay less than the plan's own,
    # so did not take a try on the payday axis (choose).
    passed_over: Belief | None = None
    # On the time axis: the drawn chance of recovering the case with this try
    # and the plan's tries after it, at this moment and at the plan's own
    # (None when the plan's is out of reach).
    chance: float | None = None
    plan_chance: float | None = None
    tries_after: int = 0

    def why(self) -> str:
        if self.moment == self.plan_moment:
            reason = "the plan's own moment"
        else:
            reason = f"moved from the plan's {self.plan_moment:%Y-%m-%d %H:%M} UTC"
        if self.chance is not None:
            drawn = (
                f"with the {self.tries_after} tries after it the case is recovered"
                f" {self.chance:.0%} of the time, as drawn"
            )
            if self.moment != self.plan_moment and self.plan_chance is not None:
                drawn += f", against {self.plan_chance:.0%} from the plan's moment"
        elif self.passed_over is None:
            drawn = f"best of {self.candidates} candidate famil(ies) drawn"
        else:
            drawn = (
                f"kept over {self.passed_over.family}, which drew best of"
                f" {self.candidates} but is believed to pay {self.passed_over.mean:.0%}"
            )
        return (
            f"{reason}; slot {self.slot}, of family {self.belief.family}:"
            f" {self.belief.mean:.0%} of retries paid (over {self.belief.outcomes} outcome(s)"
            f" and the plan's prior), {drawn}"
        )


def candidates(
    plan_moment: datetime,
    earliest: datetime,
    last: datetime,
    zone: ZoneInfo,
) -> list[datetime]:
    """The moments a retry may go to: the plan's own, and each candidate hour
    of each day from `earliest` to `last`."""
    found = {plan_moment} if earliest <= plan_moment <= last else set()
    day = earliest.astimezone(zone).date()
    while day <= last.astimezone(zone).date():
        for hour in CANDIDATE_HOURS:
            moment = datetime.combine(day, time(hour), zone).astimezone(plan_moment.tzinfo)
            if earliest <= moment <= last:
                found.add(moment)
        day += timedelta(days=1)
    return sorted(found)


def choose(
    category: str,
    anchor: datetime,
    plan_moment: datetime,
    earliest: datetime,
    window_end: datetime,
    tries_after: int,
    zone: ZoneInfo,
    last_declined: datetime,
    counts: Mapping[str, Counts],
    rng: random.Random,
    axis: Axis = Axis.PAYDAY,
) -> Choice | None:
    """The next retry's moment, from `earliest` to last_moment, by Thompson
    sampling over the candidates' families on `axis`; None when there is
    none (the plan's moment is past the window). `tries_after` is how many
    of the plan's tries remain after this one.

    One chance is drawn per family, not per slot or moment: among many slots
    believed alike the luckiest draw would win over the plan's, try after
    try, and a family that holds many candidate moments would win by the
    sheer number of its draws. Within the winning family the moment nearest
    the plan's own is taken: the family cannot tell its moments apart, the
    plan's reasons still can.

    On the payday axis the winner takes the try only when it is believed (by
    its Beta's mean) to pay at least as well as the plan's own family; else
    the plan's family keeps it. There the plan names every payday of its
    window, try n on the n-th, so a try moved off its payday also pushes the
    tries after it off theirs, a cost the moved try's own outcome never
    shows: a family earns the move with outcomes, not with one lucky draw.

    On the time axis the draws are weighed with the tries left: each
    candidate moment is worth its chance of recovering the case with the
    plan's tries after it placed where the draws are best
    (chance_of_recovery), and the try keeps the moment nearest the plan's
    among those within WORTH_MOVING of the best. Weighed alone, a late try
    wins whenever late retries pay more often, and issuer errors, which pay
    on any try, waited days for the same money; weighed with the tries
    after it, an early try that fails costs only what those cannot make up.

    Measured with `recovery simulate --policy defaults --policy learning
    --seeds 6 --spread-days 90 --days 125 --warm-days 60 --by-category`,
    against the plans alone. On the payday axis free draws cost the funds
    plan 1.2 points of its recovered share (cases after day 60: 0.1); one
    try in ten drawn freely, 0.9 (1.0); moves only after the payday, 1.9
    (2.3); the rule above 0.4 (none). On the time axis (opaque declines'
    share, the same after day 60, days from failure to recovery over all
    cases, issuer errors' mean days: 2.7 under the plans): a try weighed
    alone +3.2, +3.1, +0.97, 8.1; weighed with the tries after it and
    WORTH_MOVING at one point +2.7, +3.1, +0.60, 4.9; two points +1.8,
    +3.1, +0.38, 3.3; three +1.4, +1.9, +0.26, 3.2; one point, and later
    moves also held to a gain by the Beta means +1.1, +2.7, +0.34, 3.9;
    one point, the tries after valued at the means +1.5, +2.7, +0.58, 5.0
    (the means learn late tries slowly). Over 10 seeds of 600 (--size 600),
    one point against two: the recovered share of the cases failing after
    day 60 +0.6 [+0.0, +1.1] against +0.3 [-0.1, +0.6] points, days from
    failure to recovery +0.52 against +0.37."""
    latest = last_moment(axis, plan_moment, window_end, tries_after)
    moments = candidates(plan_moment, earliest, latest, zone)
    if not moments:
        return None
    plan_slot = slot_of(category, anchor, plan_moment, zone, last_declined)
    plans_family = family_of(plan_slot, axis)

    def slot_at(moment: datetime) -> str:
        return slot_of(category, anchor, moment, zone, last_declined)

    def family_at(moment: datetime) -> str:
        return family_of(slot_at(moment), axis)

    by_family: dict[str, list[datetime]] = {}
    for moment in moments:
        by_family.setdefault(family_at(moment), []).append(moment)
    kin = families(counts, axis)
    # Families in order of their first moment, so the draws are reproducible.
    draws: dict[str, tuple[float, Belief]] = {}

    def draw(family: str) -> tuple[float, Belief]:
        if family not in draws:
            held = family_belief(family, kin, plans_family)
            draws[family] = (rng.betavariate(held.paid, held.declined), held)
        return draws[family]

    for family in by_family:
        draw(family)
    if axis is Axis.TIME:
        return _choose_on_time(
            moments,
            plan_moment,
            plan_slot,
            window_end,
            tries_after,
            slot_at,
            lambda at: draw(family_at(at)),
            len(by_family),
        )
    drawn, held = max(draws.values(), key=lambda each: each[0])
    passed_over = None
    if plans_family in draws and held.mean < draws[plans_family][1].mean:
        passed_over = held
        drawn, held = draws[plans_family]
    moment = min(by_family[held.family], key=lambda at: (abs(at - plan_moment), at))
    return Choice(
        moment, slot_at(moment), held, drawn, plan_moment, plan_slot, len(by_family), passed_over
    )


def chance_of_recovery(
    rate_at: Callable[[datetime], float], moment: datetime, window_end: datetime, tries_after: int
) -> float:
    """The chance a case is recovered by a try at `moment` and `tries_after`
    more, MIN_GAP apart before `window_end`, each where retries are believed
    to pay most, when a try at `at` pays with `rate_at(at)`. What a try
    moved late wins is weighed against what the tries after it would have
    won anyway: a failed early try still leaves them."""
    later = []
    at = moment + MIN_GAP
    while at <= window_end:
        later.append(rate_at(at))
        at += MIN_GAP
    missed = 1 - rate_at(moment)
    for rate in sorted(later, reverse=True)[:tries_after]:
        missed *= 1 - rate
    return 1 - missed


def _choose_on_time(
    moments: list[datetime],
    plan_moment: datetime,
    plan_slot: str,
    window_end: datetime,
    tries_after: int,
    slot_at: Callable[[datetime], str],
    drawn_at: Callable[[datetime], tuple[float, Belief]],
    families_drawn: int,
) -> Choice:
    """On the time axis: the moment nearest the plan's among those whose
    chance of recovering the case, with the tries after it, is within
    WORTH_MOVING of the best (chance_of_recovery, with the chances drawn
    for each moment's family, `drawn_at`)."""

    def rate_at(at: datetime) -> float:
        return drawn_at(at)[0]

    chances = {at: chance_of_recovery(rate_at, at, window_end, tries_after) for at in moments}
    best = max(chances.values())
    moment = min(
        (at for at, chance in chances.items() if chance >= best - WORTH_MOVING),
        key=lambda at: (abs(at - plan_moment), at),
    )
    drawn, held = drawn_at(moment)
    return Choice(
        moment, slot_at(moment), held, drawn, plan_moment, plan_slot, families_drawn,
        chance=chances[moment], plan_chance=chances.get(plan_moment), tries_after=tries_after,
    )  # fmt: skip


def last_moment(
    axis: Axis, plan_moment: datetime, window_end: datetime, tries_after: int
) -> datetime:
    """The latest a retry may go. On the payday axis a little after the
    plan's own moment: the plan already names every payday, a retry moved
    further would skip one. On the time axis as late as leaves room, MIN_GAP
    apart, for the plan's tries after it: if retries pay more the longer the
    issuer has had, the budget of tries is best spent late, and only the
    outcomes can say whether they do."""
    near_plan = min(plan_moment + LATER_BY, window_end)
    if axis is Axis.PAYDAY:
        return near_plan
    return max(near_plan, window_end - tries_after * MIN_GAP)


def min_gap(plan_offset_gap: timedelta) -> timedelta:
    """The least time between two tries: MIN_GAP, or less when the plan's own
    tries are closer (a quick first try after an issuer's error)."""
    return min(MIN_GAP, max(plan_offset_gap, timedelta()))
