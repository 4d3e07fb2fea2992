"""SMS end to end on PostgreSQL: the engine's reminders through Twilio's own
SDK to the project's Twilio-compatible server, customers' replies and
delivery reports signed as Twilio signs them, checked by the SDK's validator."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from recovery import clock
from recovery.config import get_settings
from recovery.customers import i18n, sms, texting
from recovery.db import session_scope
from recovery.models import SmsOptOut, TextMessage

from .conftest import T0, Stack, free_port
from .factories import sim_post, the_case

PHONE = "+12125550123"
NEW_YORK = {"country": "US", "state": "NY", "postal_code": "10001"}


@pytest.fixture
def twilio():
    from recovery.sim.servers import start_wsgi_in_thread
    from recovery.sim.twilio import TwilioSim

    fake = TwilioSim()
    server = start_wsgi_in_thread(fake.wsgi)
    fake.url = server.url
    yield fake
    server.stop()


@pytest.fixture
def sms_stack(db, sim, twilio, monkeypatch):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for name, value in {
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_FROM": "+15005550006",
        "TWILIO_API_BASE": twilio.url,
        "PUBLIC_BASE_URL": base,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    server = start_asgi_in_thread(make_app(get_settings()), port=port)
    yield Stack(sim, base, T0)
    server.stop()
    clock.set_now(None)
    get_settings.cache_clear()


def failing(stack: Stack, consent: str | None = "true", decline: str = "expired_card") -> dict:
    return stack.failed(
        {"mode": "decline", "decline_code": decline},
        address=NEW_YORK,
        phone=PHONE,
        metadata={"sms_consent": consent} if consent else {},
    )


def texts() -> list[TextMessage]:
    with session_scope() as session:
        return list(session.scalars(select(TextMessage).order_by(TextMessage.id)))


def at_new_york(hour: int, day: int = 0):
    local = T0.astimezone(ZoneInfo("America/New_York")).replace(hour=hour, minute=0)
    return (local + timedelta(days=day)).astimezone(ZoneInfo("UTC"))


def test_the_customer_action_reminder_goes_by_sms_once_and_its_delivery_is_recorded(
    sms_stack, twilio
):
    stack = sms_stack
    stack.at(at_new_york(10))
    scenario = failing(stack)
    stack.tick()
    sent = twilio.sent_to(PHONE)
    assert len(sent) == 1
    body = sent[0]["body"]
    assert "Add a new card" in body and "$20.00" in body and "/r/" in body
    assert sms.fits_one_sms(body)
    # The day-3 reminder is by email alone: one SMS per template and case.
    stack.run_until(stack_now() + timedelta(days=4), step=timedelta(hours=6))
    assert len(twilio.sent_to(PHONE)) == 1
    # Twilio's delivery report, signed, lands on the row.
    assert twilio.flush() == 2
    (text,) = texts()
    assert (text.status, text.delivery_status, text.provider_id) == (
        "sent",
        "delivered",
        sent[0]["sid"],
    )
    case = the_case(scenario["invoice"])
    assert text.case_id == case.id


def stack_now():
    return clock.now()


def test_never_between_20_and_9_in_the_customers_zone(sms_stack, twilio):
    stack = sms_stack
    stack.at(at_new_york(21))
    failing(stack)
    stack.tick()
    assert twilio.sent_to(PHONE) == []  # 21:00 in New York
    (text,) = texts()
    assert text.next_attempt_at == at_new_york(9, day=1)
    stack.tick(at_new_york(8, day=1) + timedelta(minutes=59))
    assert twilio.sent_to(PHONE) == []
    stack.tick(at_new_york(9, day=1))
    assert len(twilio.sent_to(PHONE)) == 1


def test_no_consent_no_sms(sms_stack, twilio):
    stack = sms_stack
    stack.at(at_new_york(10))
    failing(stack, consent=None)
    stack.tick()
    assert twilio.sent_to(PHONE) == []
    (text,) = texts()
    assert (text.status, text.last_error) == ("skipped", "no consent to SMS")


def test_stop_is_honoured_at_once_help_answers_and_a_forged_reply_is_refused(sms_stack, twilio):
    stack = sms_stack
    inbound = f"{stack.receiver}/twilio/inbound"
    status, _ = twilio.reply(inbound, PHONE, "stop")
    assert status == 200
    stack.at(at_new_york(10))
    failing(stack)
    stack.tick()
    assert twilio.sent_to(PHONE) == []
    assert texts()[0].last_error == "the number answered STOP"
    status, twiml = twilio.reply(inbound, PHONE, "HELP")
    assert status == 200 and "Reply STOP to stop." in twiml
    # A reply not signed with our auth token changes nothing.
    from recovery.sim.twilio import TwilioSim

    forger = TwilioSim(auth_token="not_our_token_0000000000000000")
    assert forger.reply(inbound, PHONE, "START")[0] == 403
    with session_scope() as session:
        assert session.get(SmsOptOut, PHONE) is not None
    assert twilio.reply(inbound, PHONE, "START")[0] == 200
    with session_scope() as session:
        assert session.get(SmsOptOut, PHONE) is None


class Dies(Exception):
    """Not caught by the sender: the worker is gone."""


class DyingTransport:
    """Twilio's, but the worker dies before or after handing the SMS over."""

    def __init__(self, settings, after: bool) -> None:
        self.real, self.after = sms.TwilioTransport(settings), after

    def send(self, to, body, status_callback):
        if self.after:
            self.real.send(to, body, status_callback)
        raise Dies

    def sent_since(self, to, since, body):
        return self.real.sent_since(to, since, body)


@pytest.mark.parametrize("after", [True, False], ids=["after-twilio-took-it", "before"])
def test_a_worker_dying_mid_send_sends_it_once(sms_stack, twilio, after):
    stack = sms_stack
    stack.at(at_new_york(10))
    failing(stack)
    settings = get_settings()
    # The engine's pass queues the SMS (and sends it): start again from the
    # queued row, with a worker that dies sending it.
    stack.tick()
    twilio.state.messages.clear()
    with session_scope() as session:
        text = session.scalars(select(TextMessage)).one()
        text.status, text.provider_id, text.sent_at = "pending", None, None
    with pytest.raises(Dies):
        texting.send_due(clock.now(), settings, DyingTransport(settings, after))
    assert texts()[0].status == "sending"
    # The lease runs out; the next pass asks Twilio before sending anything.
    stack.at(clock.now() + texting.LEASE + timedelta(seconds=1))
    texting.send_due(clock.now(), settings)
    texting.send_due(clock.now(), settings)
    assert len(twilio.sent_to(PHONE)) == 1
    assert texts()[0].status == "sent"


@pytest.mark.parametrize("locale", i18n.LOCALES)
@pytest.mark.parametrize(
    "template", ["payment_failed", "card_update_needed", "authentication_required", "final_notice"]
)
def test_every_sms_fits_one_message_in_every_language(db, locale, template):
    settings = get_settings()
    link = f"{settings.public_base_url}/r/{'x' * 16}"
    body = texting.compose(template, settings, locale, link, 123456, "eur", T0)
    assert body is not None and sms.fits_one_sms(body) and link in body
    if locale != "ja":
        # GSM-7 languages say it all; Japanese (70 characters) may fall back.
        assert body != f"{settings.brand_name}: {link}", (locale, template)


def test_plans_explain_names_the_sms_steps(db):
    from click.testing import CliRunner

    from recovery.cli import cli

    shown = CliRunner().invoke(cli, ["plans", "explain"]).output
    assert "also SMS: card_update_needed, final_notice" in shown


def test_the_file_sink_is_the_embedded_default(tmp_path):
    from recovery.config import load_settings

    settings = load_settings({"SMS_DIR": str(tmp_path)})
    sink = sms.transport(settings)
    assert isinstance(sink, sms.FileSink)
    sid = sink.send(PHONE, "hello", None)
    assert sink.sent_since(PHONE, T0 - timedelta(days=3650), "hello") == sid


def test_gsm7_and_ucs2_limits():
    assert sms.fits_one_sms("a" * 160) and not sms.fits_one_sms("a" * 161)
    assert sms.fits_one_sms("€" * 80) and not sms.fits_one_sms("€" * 81)  # two septets each
    assert sms.fits_one_sms("あ" * 70) and not sms.fits_one_sms("あ" * 71)
    assert not sms.fits_one_sms("ç" + "a" * 70)  # one character outside GSM-7: UCS-2


def test_sim_customer_has_the_phone(sim):
    made = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {"phone": PHONE})
    assert sim.state.objects[made["customer"]]["phone"] == PHONE


def test_stats_count_sent_clicked_and_recovered_by_channel(sms_stack, twilio):
    import re
    import urllib.request

    from recovery import stats

    stack = sms_stack
    stack.at(at_new_york(10))
    failing(stack)
    stack.tick()
    link = re.search(r"(http\S+/r/\S+)", twilio.sent_to(PHONE)[0]["body"]).group(1)
    with urllib.request.urlopen(link, timeout=10) as answer:  # the customer taps it
        assert answer.status == 200
    with session_scope() as session:
        rows = {r["name"]: r for r in stats.compute(session)["by_channel"]}
    assert (rows["sms"]["sent"], rows["sms"]["reached"], rows["sms"]["clicked"]) == (1, 1, 1)
    assert rows["email"]["sent"] >= 1 and rows["email"]["clicked"] == 0
    assert set(rows) == {"email", "sms", "notice", "app", "webhook"}
