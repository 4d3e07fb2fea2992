"""The customer side on SQLite, the embedded default: the outbox and links
without PostgreSQL's SKIP LOCKED or UPDATE-in-CTE."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy

from sqlalchemy import select

from recovery.config import get_settings
from recovery.customers import delivery, links, outbox
from recovery.db import get_engine, session_scope
from recovery.models import Customer, LinkPurpose, RecoveryCase, RecoveryLink

NOW = datetime(2026, 11, 2, 9, tzinfo=UTC)


def test_outbox_and_links_on_sqlite(sqlite):
    with session_scope() as session:
        customer = Customer(stripe_customer_id="cus_1", email="jenny.rosen@example.com")
        session.add(customer)
        session.flush()
        case = RecoveryCase(
            invoice_id="in_1",
            customer_id=customer.id,
            stripe_customer_id="cus_1",
            amount_due=1500,
            currency="jpy",
            category="retry",
            hosted_invoice_url="https://invoice.stripe.com/i/acct_1/test_1",
        )
        session.add(case)
        session.flush()
        key = outbox.case_key(case.id, "email:retry:0")
        queued = [
            outbox.enqueue(session, key, "payment_failed", "email:retry:0", NOW, case_id=case.id)
            for _ in range(2)
        ]
        assert queued == [True, False]
        case_id = case.id
    ids = outbox.claim(NOW, 10)
    assert outbox.claim(NOW, 10) == []  # claimed once
    assert delivery.send_all(ids, NOW, get_settings()) == {ids[0]: "sent"}
    [eml] = (sqlite / "out").glob("*.eml")
    message = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert "¥1,500" in message.get_body(("plain",)).get_content()

    with session_scope() as session:
        token = links.mint(session, LinkPurpose.PAY, NOW, timedelta(days=1), case_id=case_id)
    with get_engine().connect() as conn:
        clicked = links.click(conn, token, NOW)
        assert clicked.live and clicked.hosted_invoice_url.endswith("test_1")
        assert links.click(conn, links.new_token(), NOW) is None
        conn.commit()

    assert links.redeem(token, NOW, get_settings()).page == "choose"
    answer = links.redeem(token, NOW, get_settings(), links.Choice.PAY)
    assert (answer.status, answer.location) == (303, "https://invoice.stripe.com/i/acct_1/test_1")
    assert links.redeem(token, NOW + timedelta(days=2), get_settings()).status == 404
    # Every live click counted, the autocommitted ones of redeem as well.
    with session_scope() as session:
        mine = RecoveryLink.token_hash == links.token_hash(token)
        link = session.scalars(select(RecoveryLink).where(mine)).one()
        assert (link.click_count, link.first_clicked_at) == (3, NOW)
