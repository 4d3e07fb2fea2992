"""Operator commands for emails and links."""

from __future__ import annotations

import json

from click.testing import CliRunner
from sqlalchemy import select

from recovery.cli import cli
from recovery.db import session_scope
from recovery.models import AuditEntry, RecoveryLink


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_preview_with_sample_data_in_a_locale(tmp_path):
    out = tmp_path / "pf.html"
    result = run(
        "emails",
        "preview",
        "payment_failed",
        "--locale",
        "ja_JP",
        "--currency",
        "jpy",
        "--out",
        str(out),
        "--text",
    )
    assert result.exit_code == 0, result.output
    assert "Subject: Our service：お支払いが完了しませんでした" in result.output
    assert "￥1,500" in result.output and "￥1,500" in out.read_text()


def test_a_preview_links_to_this_installations_address(monkeypatch):
    from recovery.config import get_settings

    monkeypatch.setenv("PUBLIC_BASE_URL", "https://pay.acme-shop.io")
    get_settings.cache_clear()
    try:
        preview = run("emails", "preview", "payment_failed", "--text")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert "https://pay.acme-shop.io/r/sample-link-token" in preview.output
    assert "https://pay.acme-shop.io/u/sample-opt-out-token" in preview.output
    assert "billing.example.com" not in preview.output


def test_preview_with_a_real_case_mints_no_link(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    with session_scope() as session:
        before = len(session.scalars(select(RecoveryLink)).all())
    result = run("emails", "preview", "card_update_needed", "--case", scenario["invoice"])
    assert result.exit_code == 0, result.output
    assert "the card on file has expired" in result.output and "$20.00" in result.output
    with session_scope() as session:
        assert len(session.scalars(select(RecoveryLink)).all()) == before


def test_send_test_goes_through_the_configured_transport(smtp_sink):
    result = run("emails", "send-test", "card_expiring", "--to", "ops@example.com")
    assert result.exit_code == 0, result.output
    [(to, message)] = smtp_sink.messages
    assert to == ["ops@example.com"] and message["Subject"].startswith("[test] ")


def test_bad_input_is_a_clear_error(db):
    assert run("emails", "preview", "nope").exit_code == 2
    assert run("emails", "send-test", "recovered", "--to", "not-an-address").exit_code == 2
    unknown = run("links", "revoke", "999")
    assert unknown.exit_code == 1 and "no case '999'" in unknown.output
    assert run("emails", "preview", "recovered", "--case", "in_nope").exit_code == 1


def test_revoke_links_and_list_the_outbox(stack):
    scenario = stack.failed({"mode": "decline", "decline_code": "expired_card"})
    stack.tick()
    result = run("links", "revoke", scenario["invoice"], "--reason", "asked to stop")
    assert result.exit_code == 0 and json.loads(result.output)["revoked"] == 1
    with session_scope() as session:
        links = session.scalars(select(RecoveryLink).where(RecoveryLink.case_id.is_not(None)))
        assert all(link.revoked_at is not None for link in links)
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "links_revoked"))
        assert audit.one().detail["reason"] == "asked to stop"
    listed = json.loads(run("emails", "list", "--json").output)
    assert [m["template"] for m in listed] == ["card_update_needed"]
    assert "card_update_needed" in run("cases", "show", scenario["invoice"]).output
