"""Backtesting plans: the same population, the same clock, one run per plan.

Each plan is run by demo.run (the production code path on a simulated clock)
against an identical population and seed, so the only difference between the
columns is the plan. The population is synthetic (population.py states its
assumptions), or built from the cases already in the database: their causes,
amounts and currencies are real; whether a card works again later, and how
customers answer emails, is still drawn from population.py's assumptions.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from recovery.db import session_scope
from recovery.models import RecoveryCase
from recovery.sim import demo, population

BY_NAME = {cause.name: cause for cause in population.CAUSES}


def population_from_cases(seed: int, limit: int) -> list[population.Member]:
    """Members shaped like the stored cases (cause, amount, currency, brand)."""
    with session_scope() as session:
        cases = session.scalars(select(RecoveryCase).order_by(RecoveryCase.id).limit(limit)).all()
        rows = [
            (c.first_decline_code or c.decline_code, c.amount_due, c.currency, c.card_brand)
            for c in cases
        ]
    if not rows:
        raise ValueError("there are no cases in the database to backtest on")
    drawn = population.synthetic(len(rows), seed, demo.START)
    members = []
    rng = random.Random(seed)
    for member, (code, amount, currency, brand) in zip(drawn, rows, strict=True):
        cause = BY_NAME.get(code or "", BY_NAME["generic_decline"])
        truth = population.draw_truth(cause, member.fails_at, rng, f"{seed}:{member.index}")
        members.append(
            replace(
                member,
                cause=cause,
                amount=amount,
                currency=currency,
                brand=brand or member.brand,
                truth=truth,
            )
        )
    return members


def run(
    plans: dict[str, str | None],
    members: list[population.Member],
    seed: int,
    days: int,
    workdir: Path,
    progress=None,
) -> dict[str, dict]:
    """Stats per plan name; `plans` maps a name to a plans file (None: the defaults)."""
    results = {}
    for name, plans_file in plans.items():
        outcome = demo.run(members, seed, days, workdir / safe_name(name), plans_file, progress)
        results[name] = {"stats": outcome.stats, "checks": outcome.checks}
    return results


def safe_name(name: str) -> str:
    """A plan's name as a directory name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "plan"
