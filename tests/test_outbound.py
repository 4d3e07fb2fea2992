"""Outbound webhooks end to end on PostgreSQL: endpoints added through the
CLI, cases moved by Stripe's (the simulator's) events and the engine's passes,
and a business's receiver that verifies every delivery with the
`standardwebhooks` library, never with our signer."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from recovery import clock
from recovery.business import announce, deliveries, egress
from recovery.cli import cli
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import cases
from recovery.models import (
    Announcement,
    Delivery,
    Endpoint,
    RecoveryCase,
    RecoveryLink,
)

from .business_app import BusinessApp, start
from .conftest import T0
from .factories import make_case, the_case


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    return result


@pytest.fixture
def local_ok(monkeypatch):
    """The business's receiver runs on this machine: allow loopback."""
    monkeypatch.setenv("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("OUTBOUND_ALLOWED_NETWORKS")
    get_settings.cache_clear()


@pytest.fixture
def app():
    business = BusinessApp()
    server = start(business)
    yield business
    server.shutdown()
    server.server_close()


def add_endpoint(app: BusinessApp, *options: str) -> int:
    result = run("endpoints", "add", app.url, *options)
    assert result.exit_code == 0, result.output
    endpoint_id = int(re.search(r"endpoint (\d+) added", result.output).group(1))
    secret = re.search(r"(whsec_\S+)", result.output).group(1)
    app.secrets.append(secret)
    return endpoint_id


def documented() -> dict[str, set[str]]:
    """Each event's `data` properties, as docs/webhooks.md's schemas give them."""
    import json

    from .conftest import ROOT

    page = (ROOT / "docs" / "webhooks.md").read_text()
    schemas = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", page, re.S)]
    return {schema["title"]: set(schema["properties"]) for schema in schemas}


def matches_the_docs(received) -> None:
    schemas = documented()
    for r in received:
        assert set(r.data) == schemas[r.type], r.type
        if "case" in r.data:
            assert set(r.data["case"]) == schemas["case"]


def deliver(now=None) -> dict[int, str]:
    """One dispatch pass, sent in this process."""
    outcomes: dict[int, str] = {}
    deliveries.dispatch(
        now or clock.now(), lambda b: outcomes.update(deliveries.send(b, get_settings()))
    )
    return outcomes


def test_a_case_told_from_failure_to_recovery_every_delivery_verified(stack, app, local_ok):
    add_endpoint(app)
    scenario = stack.failed(
        {
            "mode": "decline",
            "decline_code": "insufficient_funds",
            "succeed_after": int((T0 + timedelta(days=2, hours=12)).timestamp()),
        }
    )
    stack.tick()
    stack.run_until(T0 + timedelta(days=6))
    case = the_case(scenario["invoice"])
    assert case.status == "recovered"
    got = list(app.accepted().values())
    assert [r.type for r in got] == ["case.opened", "case.final_action_scheduled", "case.recovered"]
    assert all(r.verified_by == app.secrets for r in got)  # by the library, with our secret
    assert [r.data["sequence"] for r in got] == [1, 2, 3]
    recovered = got[-1].data
    assert recovered["how"] == "retry" and recovered["amount_recovered"] == 2000
    assert recovered["case"]["invoice"] == scenario["invoice"]
    final = got[1].data
    assert final["final_action"] in ("cancel_subscription", "mark_uncollectible")
    assert final["at"] > T0.isoformat()[:10]
    # Nothing personal: the customer is their Stripe id.
    assert all("@" not in str(r.data) for r in got)
    matches_the_docs(got)


def test_customer_action_required_carries_a_fresh_link_and_leaves_the_emails(stack, app, local_ok):
    add_endpoint(app, "--events", "case.customer_action_required")
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    stack.tick(T0 + timedelta(minutes=1))
    got = list(app.accepted().values())
    assert [r.type for r in got] == ["case.customer_action_required"]  # only what it hears
    data = got[0].data
    assert data["action"] == "update_card" and data["link"]["url"].startswith(
        get_settings().public_base_url + "/r/"
    )
    matches_the_docs(got)
    token = data["link"]["url"].rsplit("/", 1)[-1]
    from recovery.customers.links import token_hash

    case = the_case(scenario["invoice"])
    with session_scope() as session:
        live = session.scalars(
            select(RecoveryLink).where(
                RecoveryLink.case_id == case.id, RecoveryLink.revoked_at.is_(None)
            )
        ).all()
        assert token_hash(token) in {link.token_hash for link in live}
        # The link the customer needs: a new card, not only paying.
        handed = next(link for link in live if link.token_hash == token_hash(token))
        assert (handed.purpose, handed.channel) == ("update_card", "webhook")
        # The email's link still works beside the app's.
        assert len(live) >= 2
        assert session.scalar(select(func.count()).select_from(Announcement)) >= 1
        # The token itself is stored nowhere.
        assert token not in str(session.scalars(select(Announcement.data)).all())


def test_a_receiver_down_three_attempts_gets_each_event_once(stack, app, local_ok):
    endpoint_id = add_endpoint(app)
    app.statuses = [500, 503, 502]
    with session_scope() as session:
        case = make_case(session)
        for _ in range(2):
            announce.case_event(session, case, announce.PAUSED, clock.now())
    outcomes = deliver()
    assert set(outcomes.values()) == {"retrying"}  # the first failed, the second with it
    # Svix's schedule: 5 s, then 5 min, then 30 min.
    for wait in (timedelta(seconds=5), timedelta(minutes=5), timedelta(minutes=30)):
        assert deliver(clock.now() + wait - timedelta(seconds=1)) == {}
        stack.at(clock.now() + wait)
        deliver()
    accepted = app.accepted()
    assert len(accepted) == 2
    by_id: dict[str, int] = {}
    for attempt in app.attempts:
        by_id[attempt.webhook_id] = by_id.get(attempt.webhook_id, 0) + 1
    # The first event was tried at each step of the schedule with its one
    # id; the second waited behind it (not sent to an endpoint that had just
    # failed), then went with it.
    assert sorted(by_id.values()) == [1, 4]
    assert sorted(a.headers["x-answered"] for a in app.attempts) == [
        "200",
        "200",
        "500",
        "502",
        "503",
    ]
    listed = run("endpoints", "deliveries", "--endpoint", str(endpoint_id), "--json")
    assert listed.exit_code == 0 and '"status": "delivered"' in listed.output


def test_after_the_last_attempt_a_delivery_is_failed_and_visible(stack, app, local_ok):
    endpoint_id = add_endpoint(app)
    app.statuses = [500] * 20
    with session_scope() as session:
        announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
    for wait in deliveries.SCHEDULE:
        stack.at(clock.now() + wait)
        deliver()
    assert len(app.attempts) == len(deliveries.SCHEDULE) == 8
    listed = run("endpoints", "deliveries", "--status", "failed")
    assert "HTTP 500" in listed.output and " 8 tries" in listed.output
    # An operator replays it once the receiver is fixed: the same webhook-id.
    app.statuses = []
    replayed = run("endpoints", "replay", "--since", T0.isoformat(), "--endpoint", str(endpoint_id))
    assert replayed.exit_code == 0, replayed.output
    deliver()
    assert len(app.accepted()) == 1
    assert {a.webhook_id for a in app.attempts} == set(app.accepted())


def test_410_disables_the_endpoint_and_other_endpoints_go_on(stack, app, local_ok):
    gone = add_endpoint(app)
    other_app = BusinessApp()
    server = start(other_app)
    try:
        add_endpoint(other_app)
        app.statuses = [410]
        with session_scope() as session:
            case = make_case(session)
            for _ in range(3):
                announce.case_event(session, case, announce.PAUSED, clock.now())
        deliver()
        assert len(app.attempts) == 1 and len(other_app.accepted()) == 3
        with session_scope() as session:
            endpoint = session.get(Endpoint, gone)
            assert endpoint.status == "disabled" and "410" in endpoint.disabled_reason
        listed = run("endpoints", "list")
        assert "disabled (the endpoint answered 410 Gone)" in listed.output
        assert "whsec_" not in listed.output  # secrets are never listed
        # Enabled again, what waited is delivered.
        assert run("endpoints", "enable", str(gone)).exit_code == 0
        deliver()
        assert len(app.accepted()) == 2  # the two the 410 batch left pending
    finally:
        server.shutdown()
        server.server_close()


def test_an_endpoint_failing_for_five_days_is_disabled(stack, app, local_ok):
    endpoint_id = add_endpoint(app)
    app.statuses = [500] * 100
    for _ in range(6):
        with session_scope() as session:
            announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
        deliver()
        stack.at(clock.now() + timedelta(days=1))
    with session_scope() as session:
        endpoint = session.get(Endpoint, endpoint_id)
        assert endpoint.status == "disabled" and "failing since" in endpoint.disabled_reason


def test_during_a_rotation_both_secrets_verify(stack, app, local_ok):
    endpoint_id = add_endpoint(app)
    old = app.secrets[0]
    rotated = run("endpoints", "rotate-secret", str(endpoint_id))
    assert rotated.exit_code == 0
    new = re.search(r"(whsec_\S+)", rotated.output).group(1)
    app.secrets = [old, new]
    with session_scope() as session:
        announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
    deliver()
    (got,) = app.accepted().values()
    assert got.verified_by == [old, new]  # each secret alone verifies it
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    # A day later only the new secret signs.
    stack.at(clock.now() + timedelta(hours=24, seconds=1))
    with session_scope() as session:
        announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
    deliver()
    latest = app.attempts[-1]
    assert latest.verified_by == [new]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hooks",
        "http://10.0.0.1:{port}/hooks",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/hooks",
        "http://[::ffff:127.0.0.1]:{port}/hooks",
        "http://localhost:{port}/hooks",  # a name: refused when connecting
    ],
)
def test_a_delivery_never_reaches_a_private_address(stack, app, url):
    port = app.url.split(":")[2].split("/")[0]
    target = url.format(port=port)
    with session_scope() as session:
        # As if added when it resolved elsewhere: the check is at connection.
        session.add(Endpoint(url=target, secret="whsec_" + "A" * 32, events=None, status="enabled"))
        announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
    outcomes = deliver()
    assert list(outcomes.values()) == ["retrying"]
    assert app.attempts == []
    with session_scope() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert delivery.last_error.startswith("refused:")


def test_refused_at_once_when_added_by_address_and_allowed_by_network(db, monkeypatch):
    refused = run("endpoints", "add", "http://10.0.0.1/hooks")
    assert refused.exit_code == 1 and "private address" in refused.output
    assert "whsec_" not in refused.output
    metadata = run("endpoints", "add", "http://169.254.169.254/")
    assert metadata.exit_code == 1 and "metadata" in metadata.output
    monkeypatch.setenv("OUTBOUND_ALLOWED_NETWORKS", "10.0.0.0/8,169.254.0.0/16")
    get_settings.cache_clear()
    try:
        assert run("endpoints", "add", "http://10.0.0.1/hooks").exit_code == 0
        # A metadata service stays refused, whatever network is allowed.
        assert run("endpoints", "add", "http://169.254.169.254/").exit_code == 1
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("RECOVERY_ENV", "production")
    assert egress.check_url("http://app.example.com/", require_https=True) is not None


def test_a_rolled_back_change_announces_nothing(db, app, local_ok):
    add_endpoint(app)
    invoice = {"id": "in_rolled_back", "customer": "cus_x", "amount_due": 500, "currency": "usd"}
    with pytest.raises(RuntimeError), session_scope() as session:
        cases.open_case(session, invoice, None, clock.now())
        raise RuntimeError("the change failed after the case opened")
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Announcement)) == 0
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
        assert session.scalar(select(func.count()).select_from(RecoveryCase)) == 0
    with session_scope() as session:
        cases.open_case(session, invoice, None, clock.now())
    deliver()
    assert app.types() == ["case.opened"]


def test_endpoints_test_pings_and_prints_the_answer(db, app, local_ok):
    endpoint_id = add_endpoint(app)
    result = run("endpoints", "test", str(endpoint_id))
    assert result.exit_code == 0, result.output
    assert "HTTP 200" in result.output and app.types() == ["ping"]
    matches_the_docs(app.accepted().values())
    app.statuses = [503]
    failed = run("endpoints", "test", str(endpoint_id))
    assert failed.exit_code == 1 and "HTTP 503" in failed.output


def test_an_operators_pause_resume_and_cancel_are_told_in_order(stack, app, local_ok):
    add_endpoint(app)
    scenario = stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    stack.tick()
    invoice = scenario["invoice"]
    for action in ("pause", "resume", "cancel"):
        result = run(action, invoice, "--reason", "support asked")
        assert result.exit_code == 0, result.output
    deliver()
    got = sorted(app.accepted().values(), key=lambda r: r.data["sequence"])
    assert [r.type for r in got] == [
        "case.opened",
        "case.final_action_scheduled",
        "case.paused",
        "case.resumed",
        "case.closed",
    ]
    closed = got[-1].data
    assert (closed["reason"], closed["by"], closed["final_action"]) == (
        "canceled",
        "operator",
        None,
    )
    assert "support asked" not in str([r.data for r in got])  # an operator's words stay here
    matches_the_docs(got)


def test_on_sqlite_too_a_case_is_told(sqlite_stack, app, local_ok):
    add_endpoint(app)
    sqlite_stack.failed({"mode": "decline", "decline_code": "insufficient_funds"})
    sqlite_stack.tick()
    assert app.types() == ["case.opened", "case.final_action_scheduled"]
    assert all(r.verified_by for r in app.accepted().values())


def test_an_answer_is_kept_to_its_first_kib_and_no_secret_is_logged(db, local_ok, capfd):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Chatty(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b"x" * 5000
            self.send_response(500)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Chatty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
        added = run("endpoints", "add", url)
        secret = re.search(r"(whsec_\S+)", added.output).group(1)
        capfd.readouterr()
        rotated = run("endpoints", "rotate-secret", "1")
        new_secret = re.search(r"(whsec_\S+)", rotated.output).group(1)
        capfd.readouterr()
        with session_scope() as session:
            announce.case_event(session, make_case(session), announce.PAUSED, clock.now())
        deliver()
        with session_scope() as session:
            delivery = session.scalars(select(Delivery)).one()
            assert delivery.last_status_code == 500 and len(delivery.response_body) == 1024
        logged = capfd.readouterr()
        assert secret not in logged.out + logged.err and new_secret not in logged.out + logged.err
        assert "whsec_" not in run("endpoints", "list", "--json").output
    finally:
        server.shutdown()
        server.server_close()


def test_a_bad_event_list_or_an_unknown_endpoint_is_a_clear_error_and_changes_nothing(db):
    refused = run("endpoints", "add", "https://app.example.com/hooks", "--events", "case.won")
    assert refused.exit_code == 1 and "unknown event type 'case.won'" in refused.output
    for action in ("disable", "enable", "rotate-secret", "test"):
        missing = run("endpoints", action, "42")
        assert missing.exit_code == 1 and "no endpoint 42" in missing.output, action
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Endpoint)) == 0
    bad_since = run("endpoints", "replay", "--since", "yesterday")
    assert bad_since.exit_code == 2 and "ISO 8601" in bad_since.output
