"""What operators see it run by: /metrics for Prometheus and `recovery status`
in the terminal, read from the real stack (the simulator's webhooks, the
engine's passes, PostgreSQL), and Stripe's requests summed across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import timedelta

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from recovery.cli import cli
from recovery.db import session_scope
from recovery.models import EventStatus, RecoveryAttempt, StepKind, StepStatus, WebhookEvent

from .conftest import BASE_ENV, ROOT, T0, reload_settings


def scrape(base: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    request = urllib.request.Request(f"{base}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_a_failed_renewal_through_the_engine(stack):
    before = scrape(stack.receiver)
    stripe_gets = value(before, "recovery_stripe_requests_total", method="get", status="200")

    paid_from = int((T0 + timedelta(days=5)).timestamp())
    stack.failed({"decline_code": "insufficient_funds", "succeed_after": paid_from})
    stack.tick()
    after = scrape(stack.receiver)
    assert value(after, "recovery_cases", status="open") == 1
    assert value(after, "recovery_events", status="processed") >= 1
    assert value(after, "recovery_events", status="pending") == 0
    assert value(after, "recovery_inbox_oldest_waiting_seconds") == 0
    assert value(after, "recovery_emails", status="sent") == 1  # the first reminder
    # The engine read the invoice and its customer from Stripe, in this process.
    assert value(after, "recovery_stripe_requests_total", method="get", status="200") > stripe_gets

    # Nobody runs the engine: the first retry falls due, then overdue.
    with session_scope() as session:
        first_retry = session.scalar(
            select(func.min(RecoveryAttempt.due_at)).where(
                RecoveryAttempt.kind == StepKind.RETRY,
                RecoveryAttempt.status == StepStatus.SCHEDULED,
            )
        )
    stack.at(first_retry + timedelta(minutes=1))
    just_due = scrape(stack.receiver)
    assert value(just_due, "recovery_steps_due", kind="retry") == 1
    assert value(just_due, "recovery_steps_overdue", kind="retry") == 0
    stack.at(first_retry + timedelta(minutes=6))
    waiting = scrape(stack.receiver)
    assert value(waiting, "recovery_steps_due", kind="retry") >= 1
    assert value(waiting, "recovery_steps_overdue", kind="retry") >= 1
    stack.run_until(T0 + timedelta(days=40), step=timedelta(hours=6))
    done = scrape(stack.receiver)
    assert value(done, "recovery_steps_due", kind="retry") == 0
    assert value(done, "recovery_retries_total", outcome="declined") >= 1
    assert value(done, "recovery_retries_total", outcome="paid") == 1
    assert value(done, "recovery_cases", status="recovered") == 1
    assert value(done, "recovery_cases", status="open") == 0
    assert value(done, "recovery_recovered_amount_total", currency="usd") == 2000

    status = CliRunner().invoke(cli, ["status", "--json"])
    assert status.exit_code == 0, status.output
    state = json.loads(status.output)
    assert state["cases"] == {
        k[1][0][1]: int(v) for k, v in done.items() if k[0] == "recovery_cases"
    }
    text = CliRunner().invoke(cli, ["status"]).output
    assert "retries" in text and "cases" in text and "recovered" in text


def test_the_inbox_backlog_shows_its_age(stack):
    stack.failed({"decline_code": "insufficient_funds"})
    stack.sim.flush()  # delivered and stored, not yet handled
    with session_scope() as session:
        session.execute(update(WebhookEvent).values(received_at=T0 - timedelta(minutes=10)))
    samples = scrape(stack.receiver)
    assert value(samples, "recovery_events", status="pending") >= 1
    assert 590 <= value(samples, "recovery_inbox_oldest_waiting_seconds") <= 610
    text = CliRunner().invoke(cli, ["status"]).output
    assert "waiting, the oldest for 600 s" in text
    with session_scope() as session:
        session.execute(update(WebhookEvent).values(status=EventStatus.PROCESSED))
    assert value(scrape(stack.receiver), "recovery_inbox_oldest_waiting_seconds") == 0


def test_metrics_ask_for_the_token_when_one_is_set(db):
    from recovery.config import get_settings
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    reload_settings(METRICS_TOKEN="prom-3f9a1c")
    try:
        server = start_asgi_in_thread(make_app(get_settings()))
        try:
            for token in (None, "wrong"):
                try:
                    scrape(server.url, token)
                except urllib.error.HTTPError as refused:
                    assert refused.code == 401
                else:
                    raise AssertionError("served without the token")
            assert value(scrape(server.url, "prom-3f9a1c"), "recovery_cases", status="open") == 0
        finally:
            server.stop()
    finally:
        reload_settings(METRICS_TOKEN="")


def test_stripe_requests_are_summed_across_processes(sim, tmp_path):
    """Each process (a gunicorn worker, a Celery child) counts its own
    requests in PROMETHEUS_MULTIPROC_DIR; one scrape adds them up."""
    env = {
        **os.environ,
        **BASE_ENV,
        "STRIPE_API_BASE": sim.url,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    calls = (
        "from recovery import stripe_api\n"
        "for _ in range({n}):\n"
        "    try:\n"
        "        stripe_api.retrieve_invoice('in_nothere')\n"
        "    except stripe_api.StripeNotFound:\n"
        "        pass\n"
    )
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", calls.format(n=n)], env=env, check=True, timeout=60)
    scraped = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from recovery import metrics;"
            " sys.stdout.write(metrics.exposition(lambda: metrics.Snapshot(at=None)).decode())",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }
    assert value(samples, "recovery_stripe_requests_total", method="get", status="404") == 5


def test_the_grafana_dashboard_and_prometheus_config_name_only_what_is_exported():
    import re
    from datetime import UTC, datetime

    import yaml

    from recovery import metrics

    exported = set()
    for family in text_string_to_metric_families(
        metrics.exposition(lambda: metrics.Snapshot(at=datetime.now(UTC))).decode()
    ):
        exported.add(family.name)
        if family.type == "counter":
            exported.add(f"{family.name}_total")
    dashboard = json.loads((ROOT / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 10
    named = {n for e in expressions for n in re.findall(r"\brecovery_[a-z_]+", e)}
    assert named and named <= exported, named - exported
    # Counters are graphed as rates or increases, never as raw totals over time.
    for expr in expressions:
        if re.search(r"\brecovery_[a-z_]+_total\b", expr):
            assert "rate(" in expr or "increase(" in expr or "sum by" in expr, expr

    scrape_jobs = yaml.safe_load((ROOT / "prometheus.yml").read_text())["scrape_configs"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    worker_port = compose["worker"]["command"][
        compose["worker"]["command"].index("--metrics-port") + 1
    ]
    targets = {
        job["job_name"]: (job.get("static_configs") or job.get("dns_sd_configs"))[0]
        for job in scrape_jobs
    }
    assert targets["recovery-web"]["targets"] == ["web:8000"]
    assert str(targets["recovery-worker"]["port"]) == worker_port
    assert compose["web"]["ports"] == ["8000:8000"]
