"""Email at most once under faults, and one bad address alone: a real SMTP
server (aiosmtpd) that can drop the connection after taking a message, with
and without SMTPUTF8."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from recovery.config import get_settings
from recovery.customers import delivery, outbox
from recovery.db import session_scope
from recovery.models import Message, MessageStatus

from .conftest import T0
from .factories import make_case, make_customer, make_message

pytestmark = pytest.mark.services


def queue(*emails: str, name: str = "Jenny Rosen") -> list[int]:
    """One reminder of an open case for each address."""
    with session_scope() as session:
        return [
            make_message(
                session, make_case(session, customer=make_customer(session, email=e, name=name))
            ).id
            for e in emails
        ]


def send_pass(at) -> dict:
    return delivery.send_all(outbox.claim(at, 50), at, get_settings())


def rows() -> dict[int, Message]:
    with session_scope() as session:
        return {m.id: m for m in session.scalars(select(Message))}


def test_an_email_in_doubt_is_sent_once_more_with_the_same_message_id(db, smtp_sink):
    [message_id] = queue("jenny.rosen@example.com")
    smtp_sink.cut = 1
    assert send_pass(T0) == {message_id: "retrying"}
    first = rows()[message_id]
    assert first.in_doubt and first.status is MessageStatus.PENDING

    assert send_pass(T0 + timedelta(minutes=2)) == {message_id: MessageStatus.SENT}
    ids = [m["Message-ID"] for _rcpt, m in smtp_sink.messages]
    assert len(ids) == 2 and ids[0] == ids[1] == first.smtp_message_id


def test_an_email_in_doubt_twice_is_never_sent_a_third_time(db, smtp_sink):
    [message_id] = queue("jenny.rosen@example.com")
    smtp_sink.cut = 5
    send_pass(T0)
    assert send_pass(T0 + timedelta(minutes=2)) == {message_id: MessageStatus.FAILED}
    send_pass(T0 + timedelta(days=1))
    assert len(smtp_sink.messages) == 2
    assert "in doubt" in rows()[message_id].last_error


OTHERS = [f"customer{n}@example.com" for n in range(5)]


@pytest.mark.parametrize("smtp_sink", [True], indirect=True)
def test_an_internationalized_address_goes_out_with_smtputf8(db, smtp_sink):
    ids = queue("josé@example.com", *OTHERS)
    assert set(send_pass(T0).values()) == {MessageStatus.SENT}
    assert sorted(r[0] for r, _m in smtp_sink.messages) == sorted(["josé@example.com", *OTHERS])
    assert all(rows()[i].status is MessageStatus.SENT for i in ids)


def test_an_address_the_server_cannot_take_fails_alone_with_a_reason(db, smtp_sink):
    josé, *others = queue("josé@example.com", *OTHERS)
    outcomes = send_pass(T0)
    assert outcomes.pop(josé) == MessageStatus.FAILED
    assert set(outcomes.values()) == {MessageStatus.SENT}
    assert sorted(r[0] for r, _m in smtp_sink.messages) == sorted(OTHERS)
    assert "SMTPUTF8" in rows()[josé].last_error
    send_pass(T0 + timedelta(days=1))  # failed for good: never tried again
    assert len(smtp_sink.messages) == len(OTHERS)


def test_a_refusal_quoting_the_customer_keeps_their_name_out_of_the_record(db, smtp_sink):
    [message_id] = queue("jenny.rosen@example.com", name="Zoe Quartermaine")
    smtp_sink.refuse.append("550 5.1.1 Zoe Quartermaine has no mailbox here")
    assert send_pass(T0) == {message_id: MessageStatus.FAILED}
    error = rows()[message_id].last_error
    assert "550" in error and "Zoe" not in error and "Quartermaine" not in error


def test_an_email_that_cannot_be_rendered_fails_alone(db, smtp_sink):
    """A template gone from TEMPLATES_DIR since the email was queued."""
    broken, *others = queue("jenny.rosen@example.com", *OTHERS)
    with session_scope() as session:
        session.execute(update(Message).where(Message.id == broken).values(template="retired"))
    outcomes = send_pass(T0)
    assert outcomes.pop(broken) == MessageStatus.FAILED
    assert set(outcomes.values()) == {MessageStatus.SENT} and len(outcomes) == len(others)
    assert rows()[broken].last_error.startswith("cannot be prepared")
