"""The demo at a small size: its numbers hold together and a seed names a run."""

from __future__ import annotations

from click.testing import CliRunner

from recovery.cli import cli
from recovery.sim import demo, population


def test_small_demo_is_consistent_and_deterministic(tmp_path):
    members = population.synthetic(40, seed=3, start=demo.START)
    first = demo.run(members, 3, 20, tmp_path / "one")
    assert first.checks and all(first.checks.values()), first.checks
    stats = first.stats
    cases = stats["cases"]
    assert cases["total"] == 40
    assert sum(v for k, v in cases.items() if k != "total") == 40
    assert stats["recovered"]["count"] == sum(p["recovered"] for p in stats["by_path"])
    assert sum(c["cases"] for c in stats["by_cause"]) == 40
    # Something happened: retries were made, emails sent, customers acted.
    assert stats["retries"]["made"] > 0 and stats["funnel"]["emails_sent"] > 0
    assert first.links_clicked > 0 and 0 < stats["recovered"]["count"] < 40
    # Suspected fraud is never written to.
    fraud = [r for r in stats["by_cause"] if r["name"] == "do_not_contact"]
    assert not fraud or fraud[0]["recovered"] == 0
    # The same seed, the same month, however the emails are worded, and
    # whether or not idle hours get a pass.
    again = demo.run(
        members, 3, 20, tmp_path / "two", settings={"BRAND_NAME": "Acme"}, every_hour=True
    )
    assert again.stats == first.stats


def test_demo_command_prints_a_summary_and_writes_the_report(tmp_path):
    result = CliRunner().invoke(
        cli, ["demo", "--size", "15", "--days", "8", "--seed", "2", "--dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "cases ·" in result.output and "how it was recovered" in result.output
    stats = demo.run(population.synthetic(15, 2, demo.START), 2, 8, tmp_path / "again").stats
    cases = stats["cases"]
    assert (
        f"still open {cases['open']} · canceled {cases['canceled']} · voided {cases['voided']}"
        f" · uncollectible {cases['uncollectible']}"
    ) in result.output
    median = stats["time_to_recover_hours"]["median"]
    assert f"time to recover: median {median / 24:.1f} days" in result.output
    assert "category (why it failed)" in result.output
    assert "against Stripe's recommended schedule on the same subscribers" in result.output
    assert "FAIL" not in result.output
    html = (tmp_path / "report.html").read_text()
    assert html.count('class="chart hbars"') == 3 and 'class="chart vbars"' in html
    assert "Recovery rate by category" in html
    # The page opens with what the terminal headlines: the comparison and the checks.
    opening = html[html.index("<main>") : html.index('class="tiles"')]
    assert "against Stripe&#39;s recommended schedule" in opening
    from markupsafe import escape

    told = [
        line.split("ok", 1)[1].strip()
        for line in result.output.splitlines()
        if line.startswith("  ok ")
    ]
    assert told and opening.count('<li class="ok">') == len(told)
    assert all(f'<li class="ok">{escape(name)}</li>' in opening for name in told)


def test_the_demo_never_empties_a_directory_it_did_not_make(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    (theirs / "report.html").write_text("theirs too")
    args = ["demo", "--size", "3", "--days", "2", "--no-compare", "--dir"]
    refused = CliRunner().invoke(cli, [*args, str(theirs)])
    assert refused.exit_code == 2 and "--dir" in refused.output, refused.output
    assert "a run did not write" in refused.output
    assert sorted(p.name for p in theirs.iterdir()) == ["report.html", "thesis.tex"]
    assert (theirs / "report.html").read_text() == "theirs too"

    # New, then made by a run: emptied and run again; an empty one is used.
    ours = tmp_path / "ours"
    assert CliRunner().invoke(cli, [*args, str(ours)]).exit_code == 0
    (ours / "outbox-from-yesterday").mkdir()  # anything in a run's own directory
    assert CliRunner().invoke(cli, [*args, str(ours)]).exit_code == 0
    assert not (ours / "outbox-from-yesterday").exists()
    assert (ours / demo.RUN_MARK).exists() and (ours / "recovery.sqlite3").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(cli, [*args, str(empty)]).exit_code == 0


def test_simulate_compares_plans_on_the_same_population(tmp_path):
    fewer = tmp_path / "fewer.toml"
    fewer.write_text("[retry]\nretry_days = [3]\nmax_tries = 1\n")
    result = CliRunner().invoke(
        cli,
        [
            "simulate",
            "--plans",
            str(fewer),
            "--size",
            "25",
            "--days",
            "12",
            "--seed",
            "4",
            "--dir",
            str(tmp_path / "runs"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    runs = json.loads(result.output[result.output.index("{") :])
    assert set(runs) == {"default", "fewer"}
    assert all(all(r["checks"].values()) for r in runs.values())
    default, few = runs["default"]["stats"], runs["fewer"]["stats"]
    assert default["cases"]["total"] == few["cases"]["total"] == 25
    # One retry at most per soft decline: fewer retries, and never more recovered by retry.
    assert few["retries"]["made"] < default["retries"]["made"]
    by_retry = {
        n: next(p for p in s["by_path"] if p["name"] == "retry")["recovered"]
        for n, s in (("default", default), ("fewer", few))
    }
    assert by_retry["fewer"] <= by_retry["default"]


def test_simulate_from_an_empty_database_is_a_clear_error(db, tmp_path):
    result = CliRunner().invoke(cli, ["simulate", "--from-db", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "no cases in the database" in result.output
