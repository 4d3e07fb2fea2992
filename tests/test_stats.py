"""Stats against a small set of cases whose numbers are worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from click.testing import CliRunner

from recovery import stats
from recovery.cli import cli
from recovery.db import session_scope
from recovery.models import Customer, Message, RecoveryAttempt, RecoveryCase, RecoveryLink

T = datetime(2026, 11, 2, 9, tzinfo=UTC)


def case(n, status, category, code, amount, currency="usd", **fields) -> RecoveryCase:
    return RecoveryCase(
        invoice_id=f"in_{n}",
        status=status,
        amount_due=amount,
        currency=currency,
        first_category=category,
        first_decline_code=code,
        first_failed_at=T,
        opened_at=T,
        **fields,
    )


def fill() -> None:
    with session_scope() as session:
        customer = Customer(stripe_customer_id="cus_1", email="a@example.com")
        session.add(customer)
        session.flush()
        cases = [
            # 1: soft decline, recovered by our second retry after 48 h
            case(
                1,
                "recovered",
                "retry",
                "insufficient_funds",
                2000,
                amount_recovered=2000,
                recovery_path="retry",
                recovered_by_step="retry:2",
                closed_at=T + timedelta(hours=48),
            ),
            # 2: soft decline, still open
            case(2, "open", "retry", "insufficient_funds", 1000),
            # 3: expired card, recovered by a card update after 24 h, in euros
            case(
                3,
                "recovered",
                "customer_action",
                "expired_card",
                1500,
                "eur",
                amount_recovered=1500,
                recovery_path="card_update",
                recovered_by_step="retry:card-update",
                closed_at=T + timedelta(hours=24),
            ),
            # 4: expired card, canceled at the end of the plan
            case(
                4,
                "canceled",
                "customer_action",
                "expired_card",
                3000,
                closed_at=T + timedelta(days=21),
            ),
            # 5: authentication, paid through our link after 12 h
            case(
                5,
                "recovered",
                "authenticate",
                "authentication_required",
                500,
                amount_recovered=500,
                recovery_path="link",
                closed_at=T + timedelta(hours=12),
            ),
            # 6: soft decline, paid elsewhere: our retry found the invoice
            # paid at Stripe and charged nothing
            case(
                6,
                "recovered",
                "retry",
                "insufficient_funds",
                700,
                amount_recovered=700,
                recovery_path="paid_elsewhere",
                closed_at=T + timedelta(hours=6),
            ),
        ]
        session.add_all(cases)
        session.flush()
        ids = {c.invoice_id: c.id for c in cases}
        for step, outcome, invoice in (
            ("retry:1", "declined", "in_1"),
            ("retry:2", "paid", "in_1"),
            ("retry:1", "declined", "in_2"),
            ("retry:card-update", "paid", "in_3"),
            # Steps that charged nothing: not retries.
            ("retry:1", "invoice_paid", "in_6"),
            ("retry:backup-card", "no_backup_card", "in_2"),
            ("retry:2", "canceled", "in_6"),
        ):
            session.add(
                RecoveryAttempt(
                    case_id=ids[invoice],
                    kind="retry",
                    step=step,
                    status="done",
                    due_at=T,
                    claims=1,
                    tries=0,
                    idempotency_key=f"k-{invoice}-{step}",
                    outcome=outcome,
                )
            )
        for invoice, template, status in (
            ("in_1", "payment_failed", "sent"),
            ("in_2", "payment_failed", "sent"),
            ("in_3", "card_update_needed", "sent"),
            ("in_3", "recovered", "sent"),
            ("in_4", "card_update_needed", "failed"),
            ("in_5", "authentication_required", "sent"),
        ):
            session.add(
                Message(
                    key=f"{invoice}:{template}",
                    case_id=ids[invoice],
                    step=template,
                    template=template,
                    status=status,
                    attempts=1,
                    next_attempt_at=T,
                )
            )
        for invoice, clicks in (("in_3", 2), ("in_5", 1), ("in_2", 0)):
            session.add(
                RecoveryLink(
                    case_id=ids[invoice],
                    token_hash=f"h{invoice}",
                    purpose="update_card",
                    expires_at=T,
                    click_count=clicks,
                )
            )


def test_stats_match_the_hand_computed_figures(db):
    fill()
    with session_scope() as session:
        s = stats.compute(session)
    assert s["cases"] == {
        "total": 6,
        "open": 1,
        "recovered": 4,
        "canceled": 1,
        "voided": 0,
        "uncollectible": 0,
    }
    assert s["at_stake"] == {"eur": 1500, "usd": 7200}
    assert s["recovered"] == {
        "count": 4,
        "amount": {"eur": 1500, "usd": 3200},
        "rate": 0.6667,
        "rate_of_closed": 0.8,
    }
    causes = {r["name"]: r for r in s["by_cause"]}
    assert (causes["retry"]["cases"], causes["retry"]["recovered"], causes["retry"]["rate"]) == (
        3,
        2,
        0.6667,
    )
    assert causes["customer_action"]["amount"] == {"eur": 1500}
    assert causes["authenticate"]["rate"] == 1.0
    assert {r["name"]: r["recovered"] for r in s["by_path"]} == {
        "retry": 1,
        "card_update": 1,
        "link": 1,
        "backup_card": 0,
        "paid_elsewhere": 1,
    }
    assert {r["name"]: r["recovered"] for r in s["by_step"]} == {
        "retry:2": 1,
        "retry:card-update": 1,
    }
    # 6, 12, 24 and 48 hours
    assert s["time_to_recover_hours"]["median"] == 18.0
    assert s["time_to_recover_hours"]["mean"] == 22.5  # the recovered only
    # Four charges reached Stripe; the step that found case 6 paid elsewhere,
    # the backup-card step with no card and the canceled one charged nothing.
    assert s["retries"] == {
        "made": 4,
        "by_answer": {"paid": 2, "declined": 2},
        "steps_that_charged_nothing": {"invoice_paid": 1, "no_backup_card": 1},
        "steps_canceled": 1,
    }
    assert s["funnel"] == {
        "cases": 6,
        "emailed": 4,
        "emails_sent": 5,
        "clicked": 2,
        "recovered_after_click": 2,
        "recovered_emailed": 3,
    }
    assert s["over_time"] == [
        {"day": "2026-11-02", "recovered": 2, "amount": {"usd": 1200}},
        {"day": "2026-11-03", "recovered": 1, "amount": {"eur": 1500}},
        {"day": "2026-11-04", "recovered": 1, "amount": {"usd": 2000}},
    ]


def test_stats_and_report_commands(db, tmp_path):
    fill()
    runner = CliRunner()
    as_json = runner.invoke(cli, ["stats", "--json"])
    assert as_json.exit_code == 0
    import json

    assert json.loads(as_json.output)["recovered"]["count"] == 4
    table = runner.invoke(cli, ["stats"])
    assert "6 cases · 4 recovered (66.7%)" in table.output
    assert runner.invoke(cli, ["stats", "--since", "yesterday"]).exit_code == 2
    out = tmp_path / "r.html"
    assert runner.invoke(cli, ["report", "--out", str(out)]).exit_code == 0
    html = out.read_text()
    assert 'class="chart hbars"' in html and "€15.00 + $32.00" in html
