"""The simulated population: its pay calendars, and a truth the engine never sees."""

from __future__ import annotations

import ast
import random
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

from recovery.sim import demo, population

ROOT = Path(__file__).resolve().parents[1]


def test_pay_calendars_fall_on_fridays_the_15th_and_the_last_business_day():
    start, end = date(2026, 10, 1), date(2026, 11, 30)
    assert population.paydays("semimonthly", start, end) == [
        date(2026, 10, 15),
        date(2026, 10, 30),  # the 31st is a Saturday
        date(2026, 11, 13),  # the 15th is a Sunday
        date(2026, 11, 30),
    ]
    assert population.paydays("monthly", start, end) == [date(2026, 10, 30), date(2026, 11, 30)]
    weekly = population.paydays("weekly", start, end)
    assert len(weekly) == 9 and all(d.weekday() == 4 for d in weekly)
    every_other = [population.paydays("biweekly", start, end, phase) for phase in (0, 1)]
    assert sorted(every_other[0] + every_other[1]) == weekly
    gaps = {b - a for a, b in zip(every_other[0], every_other[0][1:], strict=False)}
    assert gaps == {timedelta(days=14)}


def test_missing_funds_come_back_only_in_the_days_after_a_payday():
    cause = next(c for c in population.CAUSES if c.name == "insufficient_funds")
    schedules = Counter()
    for seed in range(400):
        truth = population.draw_truth(cause, demo.START, random.Random(seed), str(seed))
        assert truth.works_from is None and truth.approve_chance is None
        for opens, closes in truth.funded:
            assert opens.hour == population.DEPOSIT_HOUR and opens > demo.START
            assert timedelta(days=1) <= closes - opens <= timedelta(days=4)
        paydays = {opens.date() for opens, _ in truth.funded}
        schedules[
            "weekly-ish"
            if paydays and all(d.weekday() == 4 for d in paydays)
            else "monthly-ish"
            if paydays
            else "never"
        ] += 1
    # Some are never covered (the cause's `recovers`); most pay on Fridays (BLS shares).
    assert schedules["never"] > 60 and schedules["weekly-ish"] > schedules["monthly-ish"]


def test_the_engine_and_the_customer_side_never_import_the_simulated_population():
    for folder in ("engine", "customers", "inbox"):
        for path in (ROOT / "recovery" / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.startswith("recovery.sim") for n in names), (path, names)
