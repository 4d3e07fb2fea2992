"""The status API the business's app reads, over real HTTP on PostgreSQL,
with keys made by the CLI."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from recovery.cli import cli
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.models import ApiKey, Customer

from .factories import the_case


def key(*options: str) -> str:
    result = CliRunner().invoke(cli, ["api-keys", "create", *options])
    assert result.exit_code == 0, result.output
    return re.search(r"(rcv_\S+)", result.output).group(1)


def ask(base: str, customer: str, presented: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/api/v1/customers/{customer}/recovery")
    if presented is not None:
        request.add_header("Authorization", f"Bearer {presented}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.fixture
def expired_card(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    return scenario


def test_the_app_reads_what_the_customer_must_do_in_their_language(stack, expired_card):
    customer = expired_card["customer"]
    with session_scope() as session:
        session.execute(
            update(Customer).where(Customer.stripe_customer_id == customer).values(locale="de")
        )
    status, body = ask(stack.receiver, customer, key("--name", "app"))
    assert status == 200, body
    assert body["open"] is True and body["action"] == "update_card"
    assert (body["amount_due"], body["currency"]) == (2000, "usd")
    case = the_case(expired_card["invoice"])
    assert body["service_ends_at"].startswith(case.final_action_at.isoformat()[:16])
    says = body["says"]
    assert says["locale"] == "de"
    assert says["action"] == "Fügen Sie eine neue Karte hinzu, um Ihr Abonnement zu behalten."
    assert says["due"].startswith("20,00") and says["ends"].startswith("Ihr Dienst endet am")
    assert body["link"]["url"].startswith(get_settings().public_base_url + "/r/")
    from recovery.customers.links import token_hash
    from recovery.models import RecoveryLink

    with session_scope() as session:
        handed = session.scalars(
            select(RecoveryLink).where(
                RecoveryLink.token_hash == token_hash(body["link"]["url"].rsplit("/", 1)[-1])
            )
        ).one()
        assert (handed.purpose, handed.channel) == ("update_card", "app")
    # Nothing personal beyond the id the app asked with.
    assert "@" not in json.dumps(body)
    # The documented example has every field the answer has.
    from .conftest import ROOT

    page = (ROOT / "docs" / "app.md").read_text()
    example = json.loads(re.findall(r"```json\n(.*?)```", page, re.S)[0])
    assert set(example) == set(body) and set(example["says"]) == set(says)


def test_no_open_case_answers_open_false(stack):
    status, body = ask(stack.receiver, "cus_nobody", key("--name", "app"))
    assert (status, body) == (200, {"open": False, "customer": "cus_nobody"})


def test_a_key_reads_only_its_scopes_and_a_revoked_key_is_refused_at_once(stack, expired_card):
    customer = expired_card["customer"]
    status_only = key("--name", "support", "--scopes", "status")
    status, body = ask(stack.receiver, customer, status_only)
    assert status == 200 and body["open"] and "link" not in body
    links_only = key("--name", "odd", "--scopes", "links")
    assert ask(stack.receiver, customer, links_only)[0] == 403
    both = key("--name", "app")
    assert ask(stack.receiver, customer, both)[0] == 200
    key_id = both.split("_")[1]
    assert CliRunner().invoke(cli, ["api-keys", "revoke", key_id]).exit_code == 0
    assert ask(stack.receiver, customer, both) == (401, {"error": "invalid or revoked API key"})
    # A forged secret for a live key, no key, and a key of another shape.
    forged = status_only[: status_only.rindex("_") + 1] + "A" * 32
    for wrong in (forged, None, "sk_test_123"):
        assert ask(stack.receiver, customer, wrong)[0] == 401
    with session_scope() as session:
        stored = {k.secret_hash for k in session.scalars(select(ApiKey))}
    # Only a hash of the secret part is kept.
    assert status_only.rsplit("_", 1)[1] not in stored and len(stored) == 3
    listed = CliRunner().invoke(cli, ["api-keys", "list"])
    assert "rcv_" not in listed.output and "revoked" in listed.output


def test_requests_beyond_the_keys_rate_are_refused(monkeypatch, db, sim):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    monkeypatch.setenv("API_REQUESTS_PER_MINUTE", "3")
    get_settings.cache_clear()
    server = start_asgi_in_thread(make_app(get_settings()))
    try:
        presented = key("--name", "app")
        answers = [ask(server.url, "cus_x", presented)[0] for _ in range(5)]
        assert answers[:3] == [200, 200, 200] and answers[3:] == [429, 429]
        # Another key has its own budget.
        assert ask(server.url, "cus_x", key("--name", "other"))[0] == 200
    finally:
        server.stop()
        monkeypatch.delenv("API_REQUESTS_PER_MINUTE")
        get_settings.cache_clear()


def test_a_key_with_unknown_scopes_or_no_name_is_refused_and_nothing_is_made(db):
    from sqlalchemy import func

    for options in (["--name", "app", "--scopes", "status,admin"], ["--name", " "]):
        result = CliRunner().invoke(cli, ["api-keys", "create", *options])
        assert result.exit_code == 1 and "rcv_" not in result.output, options
    assert (
        "scopes are some of: status, links"
        in CliRunner()
        .invoke(cli, ["api-keys", "create", "--name", "app", "--scopes", "admin"])
        .output
    )
    assert CliRunner().invoke(cli, ["api-keys", "revoke", "9"]).exit_code == 1
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 0
