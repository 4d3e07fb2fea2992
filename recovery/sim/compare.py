"""Policies side by side over many seeds: each seed draws one population, and
every policy meets it on the same clock through the same engine (demo.run),
so the policy is the only difference within a seed. Each figure is reported
as a mean over the seeds with its 95% interval, and each policy against the
first as the mean of its paired per-seed differences.

The population's hidden truth (when a card works again, how a customer
answers) is drawn in population.py and reaches the engine only as Stripe's
answers and the customers' clicks.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.pool
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from statistics import fmean, stdev

from recovery.engine.classify import described
from recovery.sim import backtest, demo, population

POLICIES_DIR = Path(__file__).resolve().parent / "policies"


@dataclass(frozen=True)
class Policy:
    """A plans file (None: the engine's defaults) and the settings it runs with."""

    plans_file: str | None = None
    settings: tuple[tuple[str, str], ...] = ()


# What Stripe's schedule and the previous defaults did: nothing learned, no
# other saved card tried.
_FIXED = (("RETRY_LEARNING", "off"), ("BACKUP_CARDS", "off"))
# The notice needs a secret to sign with; any will do in a simulation.
_NOTICE = ("NOTICE_SECRET", "simulated-notice-secret-0123456789abcdef")
_SMS = ("SMS_MAX_PER_CASE", "2")
_DEFAULTS = (("RETRY_LEARNING", "off"), ("BACKUP_CARDS", "on"))
# Named policies a comparison can include besides plans files of one's own.
# Every run is by email alone unless its policy adds SMS or the notice.
BUILT_IN: dict[str, Policy] = {
    # The engine as shipped: the default plans as written, other saved cards
    # tried once the card on file has no try left.
    "defaults": Policy(None, _DEFAULTS),
    # The same, with the business's app showing the notice to its visitors,
    # with the plans' SMS steps sent to the customers who consented, or both.
    "defaults+notice": Policy(None, (*_DEFAULTS, _NOTICE)),
    "defaults+sms": Policy(None, (*_DEFAULTS, _SMS)),
    "defaults+notice+sms": Policy(None, (*_DEFAULTS, _NOTICE, _SMS)),
    # The same, each retry timed by the learner from the run's own outcomes.
    "learning": Policy(None, (("RETRY_LEARNING", "on"), ("BACKUP_CARDS", "on"))),
    "stripe-recommended": Policy(str(POLICIES_DIR / "stripe_recommended.toml"), _FIXED),
    "previous-defaults": Policy(str(POLICIES_DIR / "previous_defaults.toml"), _FIXED),
}


# Student's t at 97.5% by degrees of freedom: a 95% interval from few seeds
# is wider than the normal approximation's.
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
    16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
    40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(degrees: int) -> float:
    # The nearest tabulated degrees at or below: never narrower than the truth.
    known = [d for d in _T975 if d <= degrees]
    return _T975[max(known)] if known else math.inf


# Decimals an interval is shown with.
SHOWN_DIGITS = 3


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        d = SHOWN_DIGITS
        return f"{self.mean:.{d}f} [{self.low:.{d}f}, {self.high:.{d}f}]"


def as_shown(gap: Interval, ours: Interval, base: Interval) -> Interval:
    """A paired difference whose mean is the two means as shown, subtracted:
    the same number up to rounding, and one a reader can check by eye. The
    interval stays the paired one."""
    mean = round(ours.mean, SHOWN_DIGITS) - round(base.mean, SHOWN_DIGITS)
    return Interval(round(mean, SHOWN_DIGITS), gap.low, gap.high, gap.n)


def interval(values: Sequence[float]) -> Interval:
    """The mean and its 95% interval (Student's t; a point when n < 2)."""
    mean = fmean(values)
    if len(values) < 2:
        return Interval(mean, mean, mean, len(values))
    half = t975(len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


@dataclass(frozen=True)
class RunFigures:
    """One policy on one seed."""

    recovered_share: float  # of the failed amount (see recovered_share)
    retries_per_recovery: float
    emails_per_recovery: float
    rule_violations: int
    checks_passed: bool
    # The same share over the cases that failed after the warm-up only.
    warm_recovered_share: float | None = None
    # The share per category of failure (its plan), over all cases and after
    # the warm-up: where a policy wins or loses.
    by_category: dict[str, float] = field(default_factory=dict)
    warm_by_category: dict[str, float] = field(default_factory=dict)
    # Mean days from the failure to the recovery, over the recovered cases:
    # what a later retry costs the customer whose service waits on it.
    days_to_recovery: float = math.inf
    # Emails and SMS: what reaching the customer cost per recovery.
    messages_per_recovery: float = math.inf


def recovered_share(stats: dict) -> float:
    """The recovered part of the failed amount. Amounts in different
    currencies do not add up, so the share is taken in each currency and the
    shares weighted by how many failed cases each currency holds."""
    return _weighted_share(stats["by_currency"], stats["cases"]["total"])


def share_of(cases: Sequence[demo.CaseRow]) -> float:
    """recovered_share over some of the cases."""
    by_currency: dict[str, dict[str, int]] = {}
    for case in cases:
        row = by_currency.setdefault(case.currency, {"cases": 0, "at_stake": 0, "recovered": 0})
        row["cases"] += 1
        row["at_stake"] += case.amount
        row["recovered"] += case.recovered
    return _weighted_share(list(by_currency.values()), len(cases))


def shares_by_category(cases: Sequence[demo.CaseRow]) -> dict[str, float]:
    """share_of over each category's cases, by category name."""
    found: dict[str, list[demo.CaseRow]] = {}
    for row in cases:
        found.setdefault(row.category, []).append(row)
    return {name: share_of(rows) for name, rows in sorted(found.items())}


def _weighted_share(rows: Sequence[dict], total: int) -> float:
    return sum(
        row["cases"] / total * row["recovered"] / row["at_stake"]
        for row in rows
        if total and row["at_stake"]
    )


def figures_of(outcome: demo.Outcome, warm_from: datetime | None = None) -> RunFigures:
    stats = outcome.stats
    recovered = stats["recovered"]["count"]
    per = (lambda n: n / recovered) if recovered else (lambda n: math.inf)
    waited = stats["time_to_recover_hours"]["mean"]
    warm_cases = [c for c in outcome.cases if warm_from is not None and c.failed_at >= warm_from]
    return RunFigures(
        recovered_share=recovered_share(stats),
        retries_per_recovery=per(stats["retries"]["made"]),
        emails_per_recovery=per(stats["funnel"]["emails_sent"]),
        messages_per_recovery=per(
            sum(row["sent"] for row in stats["by_channel"] if row["name"] in ("email", "sms"))
        ),
        rule_violations=sum(outcome.violations.values()),
        checks_passed=all(outcome.checks.values()),
        warm_recovered_share=share_of(warm_cases) if warm_from is not None else None,
        by_category=shares_by_category(outcome.cases),
        warm_by_category=shares_by_category(warm_cases),
        # Infinite when none was recovered, like the figures per recovery.
        days_to_recovery=waited / 24 if waited is not None else math.inf,
    )


Metric = Callable[[RunFigures], float]
METRICS: dict[str, Metric] = {
    "recovered share of the failed amount": lambda f: f.recovered_share,
    "retries per recovery": lambda f: f.retries_per_recovery,
    "emails per recovery": lambda f: f.emails_per_recovery,
    "messages per recovery (emails and SMS)": lambda f: f.messages_per_recovery,
    "days from failure to recovery": lambda f: f.days_to_recovery,
    "card-network rule violations": lambda f: f.rule_violations,
}
WARM_METRIC = "recovered share after the warm-up"
Shares = Callable[[RunFigures], dict[str, float]]


def _share_in(shares: Shares, category: str) -> Metric:
    return lambda f: shares(f)[category]


@dataclass
class Comparison:
    policies: list[str]
    seeds: list[int]
    runs: dict[str, list[RunFigures]]  # per policy, in seed order
    warm_days: float = 0.0
    by_category: bool = False  # add the recovered share per category

    @property
    def metrics(self) -> dict[str, Metric]:
        found = dict(METRICS)
        if self.warm_days:
            found[WARM_METRIC] = lambda f: f.warm_recovered_share or 0.0
        if self.by_category:
            found.update(self._category_metrics("recovered share, ", lambda f: f.by_category))
            if self.warm_days:
                found.update(
                    self._category_metrics("after the warm-up, ", lambda f: f.warm_by_category)
                )
        return found

    def _category_metrics(self, label: str, shares: Shares) -> dict[str, Metric]:
        """A metric per category found in every run: a seed without a case of
        one would count as a share of zero in its mean."""
        found = [set(shares(f)) for name in self.policies for f in self.runs[name]]
        common: set[str] = set.intersection(*found) if found else set()
        return {f"{label}{described(name)}": _share_in(shares, name) for name in sorted(common)}

    def summary(self, metric: str) -> dict[str, Interval]:
        pick = self.metrics[metric]
        return {name: interval([pick(f) for f in self.runs[name]]) for name in self.policies}

    def against_first(self, metric: str) -> dict[str, Interval]:
        """Each policy minus the first, seed by seed: the population's luck
        cancels out of the difference."""
        pick, base = self.metrics[metric], self.runs[self.policies[0]]
        return {
            name: interval([pick(a) - pick(b) for a, b in zip(self.runs[name], base, strict=True)])
            for name in self.policies[1:]
        }

    def failed_checks(self) -> list[str]:
        return [n for n in self.policies if not all(f.checks_passed for f in self.runs[n])]


@dataclass(frozen=True)
class Population:
    """Who fails, shared by every policy of a comparison."""

    size: int
    days: int  # simulated days per run
    spread_days: float = 10.0  # failures arrive over this many days
    warm_days: float = 0.0  # figures also over cases failing after this many


def compare(
    policies: dict[str, Policy],
    seeds: Sequence[int],
    shape: Population,
    workdir: Path,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
    by_category: bool = False,
) -> Comparison:
    """Every policy on every seed's population; `jobs` runs at once, each in a
    process of its own (a run owns its process's clock and settings)."""
    runs: dict[str, list[RunFigures]] = {name: [] for name in policies}
    work = [(seed, name, policy) for seed in seeds for name, policy in policies.items()]
    hours = shape.days * 24 + 1
    if jobs <= 1:
        done = []
        for seed, name, policy in work:
            done.append(run_one(seed, shape, name, policy, workdir))
            if progress:
                progress(hours)
    else:
        with processes(jobs) as pool:
            pending = [
                pool.apply_async(run_one, (seed, shape, name, policy, workdir))
                for seed, name, policy in work
            ]
            done = []
            for result in pending:
                done.append(result.get())
                if progress:
                    progress(hours)
    for (_seed, name, _policy), figures in zip(work, done, strict=True):
        runs[name].append(figures)
    return Comparison(list(policies), list(seeds), runs, shape.warm_days, by_category)


def processes(jobs: int) -> multiprocessing.pool.Pool:
    """Processes for runs (a run owns its process's clock and settings).
    Leaving its `with` ends them at once, so Ctrl-C or a failed run stops
    the comparison there; leaving a ProcessPoolExecutor's would first run
    every run still queued, minutes of them.

    The processes ignore Ctrl-C: a terminal sends it to the whole group, and
    a worker it interrupts halfway through reading its next task leaves the
    pool's pipe mid-message, so the parent, draining that pipe to stop the
    pool, can wait on it forever. The parent alone answers Ctrl-C."""
    return multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_ctrl_c)


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_one(seed: int, shape: Population, name: str, policy: Policy, workdir: Path) -> RunFigures:
    members = population.synthetic(shape.size, seed, demo.START, shape.spread_days)
    where = workdir / backtest.safe_name(name) / f"seed-{seed}"
    outcome = demo.run(
        members, seed, shape.days, where, policy.plans_file, settings=dict(policy.settings)
    )
    warm_from = demo.START + timedelta(days=shape.warm_days) if shape.warm_days else None
    return figures_of(outcome, warm_from)
