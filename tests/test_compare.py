"""Comparing policies over seeds: the statistics, the figures, the built-in
emulation of Stripe's schedule, and the command on a small population."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from click.testing import CliRunner

from recovery.cli import cli
from recovery.engine.classify import Category
from recovery.engine.plans import load_plans
from recovery.sim import compare


def test_an_interval_uses_students_t_for_few_seeds():
    result = compare.interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert result.mean == 2.0 and result.n == 3
    assert result.low == pytest.approx(2.0 - half) and result.high == pytest.approx(2.0 + half)
    assert compare.interval([0.4]) == compare.Interval(0.4, 0.4, 0.4, 1)
    # Between tabulated degrees the wider (lower-degree) value is used.
    assert compare.t975(22) == 2.086 and compare.t975(1000) == 1.980


def test_the_recovered_share_is_taken_per_currency_and_weighted_by_cases():
    stats = {
        "cases": {"total": 4},
        "by_currency": [
            {"currency": "eur", "cases": 1, "at_stake": 1000, "recovered": 0},
            {"currency": "jpy", "cases": 3, "at_stake": 300, "recovered": 150},
        ],
    }
    assert compare.recovered_share(stats) == pytest.approx(0.75 * 0.5)


def test_the_stripe_emulation_is_eight_tries_in_two_weeks_and_four_emails():
    plans = load_plans(compare.BUILT_IN["stripe-recommended"].plans_file)
    for category in (Category.FUNDS, Category.RETRY, Category.RETRY_CAPPED):
        plan = plans[category]
        assert plan.max_tries == 8 and len(plan.retry_days) == 8
        assert max(plan.retry_days) <= 14 and plan.window_days == 14
    for category in (Category.CUSTOMER_ACTION, Category.AUTHENTICATE, Category.DEAD_CARD):
        assert plans[category].max_tries == 0  # Stripe does not retry hard declines
    assert all(len(plans[c].emails) == 4 for c in (Category.RETRY, Category.DEAD_CARD))


def test_simulate_compares_policies_over_seeds_with_intervals(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "simulate",
            "--policy",
            "stripe-recommended",
            "--policy",
            "defaults",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--size",
            "12",
            "--days",
            "10",
            "--dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["seeds"] == [1, 2] and report["checks_failed"] == []
    share = report["summary"]["recovered share of the failed amount"]
    assert set(share) == {"stripe-recommended", "defaults"}
    for figure in share.values():
        assert figure["n"] == 2 and figure["low"] <= figure["mean"] <= figure["high"]
        assert 0 <= figure["mean"] <= 1
    gap = report["against_first"]["recovered share of the failed amount"]["defaults"]
    expected = share["defaults"]["mean"] - share["stripe-recommended"]["mean"]
    assert gap["mean"] == pytest.approx(expected)


def charge(n: int, day: float, brand="visa", fingerprint="fpA", reason=None, advice=None):
    from recovery.sim import objects

    made = objects.example("charge")
    made.update(id=f"ch_{n}", created=int(day * 86400), paid=False)
    made["payment_method_details"]["card"].update(brand=brand, fingerprint=fingerprint)
    made["outcome"].update(reason=reason or "insufficient_funds", advice_code=advice)
    return made


def test_visa_allows_the_first_try_and_fifteen_more_in_thirty_days():
    from recovery.sim.rules import violations

    within = [charge(n, n * 1.5) for n in range(16)]
    assert violations(within, 15)["visa_over_cap"] == 0
    assert violations([*within, charge(16, 25)], 15)["visa_over_cap"] == 1
    assert violations([*within, charge(16, 40)], 15)["visa_over_cap"] == 0  # the first aged out
    mastercard = [charge(n, n, brand="mastercard") for n in range(17)]
    assert violations(mastercard, 15)["visa_over_cap"] == 0


@pytest.mark.parametrize(
    ("reason", "advice"),
    [("lost_card", None), ("stolen_card", None), ("generic_decline", "do_not_try_again")],
)
def test_a_card_told_never_again_is_never_tried_again(reason, advice):
    from recovery.sim.rules import violations

    told = charge(0, 0, reason=reason, advice=advice)
    assert violations([told, charge(1, 3)], 15)["after_never_again"] == 1
    assert violations([told, charge(1, 3, fingerprint="fpNEW")], 15)["after_never_again"] == 0


def test_runs_in_parallel_processes_give_the_figures_of_runs_in_one(tmp_path):
    policies = {"defaults": compare.BUILT_IN["defaults"]}
    shape = compare.Population(size=10, days=6, spread_days=4, warm_days=2)
    one = compare.compare(policies, [3, 4], shape, tmp_path / "one", jobs=1)
    two = compare.compare(policies, [3, 4], shape, tmp_path / "two", jobs=2)
    assert two.runs == one.runs and len(one.runs["defaults"]) == 2
    assert all(f.warm_recovered_share is not None for f in one.runs["defaults"])
    # Each run's cases, by the category of their first failure.
    from recovery.engine.classify import Category

    for figures in one.runs["defaults"]:
        assert figures.by_category and set(figures.by_category) <= set(Category)
        assert all(0 <= share <= 1 for share in figures.by_category.values())
        assert set(figures.warm_by_category) <= set(figures.by_category)
    # All the cases, not only those after the warm-up.
    assert any(f.by_category != f.warm_by_category for f in one.runs["defaults"])


def _figures(share: float, by_category, warm_by_category=()) -> compare.RunFigures:
    return compare.RunFigures(
        share, 4.0, 5.0, 0, True, share, dict(by_category), dict(warm_by_category)
    )


def test_the_share_per_category_is_paired_over_the_categories_every_run_has():
    runs = {
        "defaults": [
            _figures(0.5, [("funds", 0.8), ("retry_capped", 0.6)], [("funds", 0.7)]),
            _figures(0.6, [("funds", 0.9), ("retry_capped", 0.5), ("retry", 1.0)]),
        ],
        "learning": [
            _figures(0.5, [("funds", 0.7), ("retry_capped", 0.7)], [("funds", 0.6)]),
            _figures(0.6, [("funds", 0.9), ("retry_capped", 0.6), ("retry", 1.0)]),
        ],
    }
    plain = compare.Comparison(["defaults", "learning"], [1, 2], runs, warm_days=0)
    assert not any("," in name for name in plain.metrics)  # only when asked
    shown = compare.Comparison(["defaults", "learning"], [1, 2], runs, 0, by_category=True)
    # "retry" is missing from a seed: its mean would count that seed as 0.
    assert [m for m in shown.metrics if m.startswith("recovered share, ")] == [
        "recovered share, not enough money (funds)",
        "recovered share, opaque decline (retry_capped)",
    ]
    funds = shown.summary("recovered share, not enough money (funds)")["defaults"]
    assert funds.mean == pytest.approx(0.85)
    gap = shown.against_first("recovered share, opaque decline (retry_capped)")["learning"]
    assert gap.mean == pytest.approx(0.1)
    assert gap.low == pytest.approx(0.1) and gap.high == pytest.approx(0.1)  # the same each seed
    # After the warm-up: only funds has cases there in every run (none at all in seed 2).
    assert not any(m.startswith("after the warm-up, ") for m in shown.metrics)
    warm = compare.Comparison(["defaults", "learning"], [1], {k: v[:1] for k, v in runs.items()},
                              warm_days=60, by_category=True)  # fmt: skip
    warm_funds = warm.against_first("after the warm-up, not enough money (funds)")["learning"]
    assert warm_funds.mean == pytest.approx(-0.1)


def test_shares_by_category_weigh_each_categorys_cases_alone():
    from datetime import UTC, datetime

    from recovery.sim.demo import CaseRow

    day = datetime(2026, 10, 1, tzinfo=UTC)
    rows = [
        CaseRow(day, "usd", 1000, 1000, "funds"),
        CaseRow(day, "usd", 3000, 0, "funds"),
        CaseRow(day, "usd", 500, 250, "retry_capped"),
    ]
    assert compare.shares_by_category(rows) == {
        "funds": pytest.approx(0.25),
        "retry_capped": pytest.approx(0.5),
    }
    assert compare.shares_by_category([]) == {}


def test_days_to_recovery_is_the_stats_mean_in_days_and_infinite_with_none_recovered():
    from recovery.sim.demo import Outcome

    def stats(recovered: int, mean_hours: float | None) -> dict:
        return {
            "recovered": {"count": recovered},
            "retries": {"made": 4},
            "funnel": {"emails_sent": 6},
            "cases": {"total": 2},
            "by_currency": [{"cases": 2, "at_stake": 2000, "recovered": 1000 * recovered}],
            "time_to_recover_hours": {"mean": mean_hours},
            "by_channel": [
                {"name": "email", "sent": 6},
                {"name": "sms", "sent": 2},
                {"name": "notice", "sent": 5},  # links handed out, not messages
            ],
        }

    assert compare.figures_of(Outcome(stats(2, 96.0), {})).days_to_recovery == pytest.approx(4.0)
    # Messages are emails and SMS: (6 + 2) / 2 recoveries.
    assert compare.figures_of(Outcome(stats(2, 96.0), {})).messages_per_recovery == 4.0
    assert compare.figures_of(Outcome(stats(0, None), {})).days_to_recovery == math.inf


def test_by_category_asks_for_a_comparison():
    from click.testing import CliRunner

    from recovery.cli import cli

    result = CliRunner().invoke(cli, ["simulate", "--by-category"])
    assert result.exit_code == 2 and "--by-category goes with --seeds or --policy" in result.output


def test_simulate_by_category_prints_each_categorys_share_and_gap(tmp_path):
    import json

    from click.testing import CliRunner

    from recovery.cli import cli

    args = ["simulate", "--policy", "defaults", "--policy", "learning", "--seeds", "2"]
    args += ["--size", "12", "--days", "6", "--jobs", "1", "--dir", str(tmp_path), "--json"]
    shown = json.loads(CliRunner().invoke(cli, [*args, "--by-category"]).stdout)
    per_category = [m for m in shown["summary"] if m.startswith("recovered share, ")]
    assert per_category and set(per_category) <= set(shown["against_first"])
    assert set(shown["summary"][per_category[0]]) == {"defaults", "learning"}
    # How long the recovered waited, from each run's own cases.
    waited = shown["summary"]["days from failure to recovery"]["defaults"]
    assert 0 < waited["mean"] < 6


def test_the_share_over_some_cases_weighs_currencies_as_the_stats_do():
    from datetime import UTC, datetime

    from recovery.sim.demo import CaseRow

    day = datetime(2026, 10, 1, tzinfo=UTC)
    rows = [
        CaseRow(day, "eur", 1000, 0),
        CaseRow(day, "jpy", 100, 100),
        CaseRow(day, "jpy", 100, 50),
        CaseRow(day, "jpy", 100, 0),
    ]
    assert compare.share_of(rows) == pytest.approx(0.75 * 0.5)
    assert compare.share_of([]) == 0


def test_only_the_comparisons_own_process_answers_ctrl_c():
    """Its run processes ignore it, so none dies halfway through taking its
    next task off the pool's pipe; the parent ends them (the test below)."""
    import signal

    with compare.processes(1) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_ctrl_c_stops_a_comparison_at_once_and_leaves_no_process(tmp_path):
    """Queued runs are dropped, running ones ended: minutes of runs are
    left when the person presses Ctrl-C, and none of them may go on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import left_in_group, read_until

    simulate = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recovery",
            "simulate",
            "--policy",
            "defaults",
            "--seeds",
            "40",
            "--jobs",
            "2",
            "--size",
            "40",
            "--days",
            "30",
            "--dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, like a terminal's foreground job
    )
    try:
        assert simulate.stderr is not None
        read_until(simulate.stderr, "policies x 40 seeds", "recovery simulate")
        # Both processes are inside a run.
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("defaults/seed-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(simulate.pid, signal.SIGINT)
        # Forty runs take minutes here; a stop that waited for them would
        # not end within this.
        _out, err = simulate.communicate(timeout=60)
        assert simulate.returncode == 1 and "Aborted!" in err
        assert "Traceback" not in err
        assert not left_in_group(simulate.pid)
        assert len(list(tmp_path.glob("defaults/seed-*"))) < 10  # the queued never began
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(simulate.pid, signal.SIGKILL)
        simulate.communicate()


def test_a_difference_adds_up_from_the_figures_as_shown():
    from recovery.cli.dev import _headline
    from recovery.sim.compare import Interval, as_shown

    # 68.951% and 49.449% read 69.0% and 49.4%: the reader expects +19.6,
    # though the unrounded difference is 19.502.
    line = _headline(
        {
            "defaults": {"recovered_share": 0.68951, "retries_per_recovery": 4.0},
            "stripe-recommended": {"recovered_share": 0.49449, "retries_per_recovery": 6.6},
        }
    )
    assert "69.0% vs 49.4%, +19.6 points" in line, line
    ours, base = Interval(0.71349, 0.7, 0.72, 5), Interval(0.53551, 0.5, 0.55, 5)
    paired = Interval(0.17798, 0.16, 0.19, 5)
    assert (str(ours), str(base)) == ("0.713 [0.700, 0.720]", "0.536 [0.500, 0.550]")
    assert str(as_shown(paired, ours, base)) == "0.177 [0.160, 0.190]"


def test_the_channels_reach_the_simulated_customers_only_where_a_policy_adds_them(tmp_path):
    from recovery.sim import demo, population

    members = population.synthetic(40, 5, demo.START, 4)
    assert any(m.phone for m in members) and any(m.app_visits_per_week for m in members)
    # The channel traits come from a generator of their own: the rest of the
    # population is what it was before they existed.
    assert [m.truth for m in members] == [
        m.truth for m in population.synthetic(40, 5, demo.START, 4)
    ]
    seen = {}
    for name in ("defaults", "defaults+notice+sms"):
        policy = compare.BUILT_IN[name]
        outcome = demo.run(
            members, 5, 12, tmp_path / name, policy.plans_file, settings=dict(policy.settings)
        )
        assert all(outcome.checks.values()), outcome.checks
        seen[name] = ({r["name"]: r for r in outcome.stats["by_channel"]}, outcome)
    alone, _ = seen["defaults"]
    assert alone["sms"]["sent"] == 0 and alone["notice"]["sent"] == 0
    both, outcome = seen["defaults+notice+sms"]
    assert both["sms"]["sent"] > 0 and outcome.sms_read > 0
    assert outcome.notices_seen > 0 and both["notice"]["sent"] > 0
    # Only customers who consented got an SMS.
    consented = {m.phone for m in members if m.phone}
    sent = list((tmp_path / "defaults+notice+sms" / "sms").glob("*.txt"))
    import json

    assert sent and all(json.loads(p.read_text())["to"] in consented for p in sent)
