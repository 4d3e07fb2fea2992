"""One definition of each counted thing: the demo's summary, `recovery stats`,
`recovery status` and /metrics read the same database and say the same."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from .conftest import ROOT, free_port
from .test_cli_exits import recovery
from .test_worker_e2e import wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_demo_stats_status_and_metrics_count_the_same(tmp_path):
    made = recovery(tmp_path, "demo", "--size", "60", "--days", "30", "--no-compare", "--json")
    assert made.returncode == 0, made.stderr[-3000:]
    demo = json.loads(made.stdout)["stats"]
    env = {"DATABASE_URL": "sqlite:///var/demo/recovery.sqlite3"}
    stats = json.loads(recovery(tmp_path, "stats", "--json", **env).stdout)
    status = json.loads(recovery(tmp_path, "status", "--json", **env).stdout)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "recovery", "serve", "--dev", "--port", str(port)],
        cwd=tmp_path,
        env={**_clean(), **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port), 60)
        scraped = scrape(port)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def metric(name: str) -> dict[str, int]:
        return {
            dict(labels)["outcome" if "outcome" in dict(labels) else "status"]: int(value)
            for (found, labels), value in scraped.items()
            if found == name
        }

    # The demo's story includes steps that charged nothing: a count that
    # took them for retries would differ from the charges below.
    assert demo["retries"]["steps_that_charged_nothing"], demo["retries"]
    assert stats["retries"] == demo["retries"]
    made_retries = demo["retries"]["made"]
    assert made_retries == sum(demo["retries"]["by_answer"].values()) > 0
    assert sum(status["retries"].values()) == made_retries
    assert status["retries"] == demo["retries"]["by_answer"]
    assert sum(metric("recovery_retries_total").values()) == made_retries
    assert status["retry_steps_charged_nothing"] == demo["retries"]["steps_that_charged_nothing"]
    assert (
        metric("recovery_retry_steps_charged_nothing_total")
        == (demo["retries"]["steps_that_charged_nothing"])
    )

    cases = {k: v for k, v in demo["cases"].items() if k != "total"}
    assert stats["cases"] == demo["cases"]
    assert status["cases"] == cases == metric("recovery_cases")
    assert status["recovered"] == demo["recovered"]["amount"] == stats["recovered"]["amount"]
    sent = demo["funnel"]["emails_sent"]
    assert status["emails"]["sent"] == sent == stats["funnel"]["emails_sent"]
    assert metric("recovery_emails")["sent"] == sent


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except OSError:
        return False


def _clean() -> dict[str, str]:
    import os

    prefixes = ("STRIPE_", "DATABASE_", "BROKER_", "RECOVERY_", "SMTP_", "OUTBOX")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
