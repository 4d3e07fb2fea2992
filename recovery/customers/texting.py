"""SMS to customers: a row per case and step, sent at most once.

    pending ─claim─▶ claimed ─(case, consent, hours, body)─▶ sending ─provider─▶ sent
                        │ not ours: skipped                     │ lease ran out: the provider
                        ▼ quiet hours: pending at 09:00 local    ▼ is asked whether it went

A plan names which of its emails also go by SMS (plans.py, `sms`): the
first email of each named template, once per case. Each is
sent only to a customer whose Stripe customer has a phone and consent in its
metadata (SMS_CONSENT_METADATA_KEY), both read from Stripe just before
sending, whose number has not answered STOP, never between 20:00 and 09:00 in
the customer's zone, and at most SMS_MAX_PER_CASE a case. The row is marked
`sending` and committed before the provider is called; a worker that dies
after that leaves a row whose fate the provider is asked about (a message
with this body to this number since then) before anything is sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recovery import stripe_api
from recovery.config import Settings
from recovery.customers import i18n, links, sms, standing
from recovery.db import insert_ignore, session_scope
from recovery.models import (
    CaseStatus,
    Customer,
    RecoveryCase,
    SmsOptOut,
    TextMessage,
    TextStatus,
)

log = structlog.get_logger("recovery.texting")

QUIET_FROM, QUIET_UNTIL = time(20), time(9)
LEASE = timedelta(minutes=5)
RETRY_AFTER = timedelta(minutes=10)
MAX_ATTEMPTS = 5
CONSENTED = ("true", "yes", "1")
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP", "INFO"})


def key(case_id: int, template: str) -> str:
    # One SMS per case and template: the first reminder of its kind goes by
    # SMS too, the repeats by email alone.
    return f"case:{case_id}:sms:{template}"


def _zone(tz: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_allowed(now: datetime, tz: str | None) -> datetime:
    """`now`, or 09:00 in the customer's zone if `now` is between 20:00 and 09:00 there."""
    zone = _zone(tz)
    local = now.astimezone(zone)
    if QUIET_UNTIL <= local.time() < QUIET_FROM:
        return now
    day = local.date() if local.time() < QUIET_UNTIL else local.date() + timedelta(days=1)
    return datetime.combine(day, QUIET_UNTIL, tzinfo=zone).astimezone(UTC)


def enqueue(
    session: Session,
    case: RecoveryCase,
    step: str,
    template: str,
    now: datetime,
    tz: str | None,
    settings: Settings,
) -> bool:
    """Queue the step's SMS unless the case has had its share; True if queued."""
    made = session.scalar(
        select(func.count())
        .select_from(TextMessage)
        .where(TextMessage.case_id == case.id, TextMessage.status != TextStatus.SKIPPED)
    )
    if (made or 0) >= settings.sms_max_per_case:
        return False
    return insert_ignore(
        session,
        TextMessage,
        {
            "key": key(case.id, template),
            "case_id": case.id,
            "step": step,
            "template": template,
            "status": TextStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": next_allowed(now, tz),
            "in_doubt": False,
            "created_at": now,
        },
        ["key"],
    )


def claim(now: datetime, limit: int = 100) -> list[int]:
    with session_scope() as session:
        due = (
            select(TextMessage.id)
            .where(TextMessage.status == TextStatus.PENDING, TextMessage.next_attempt_at <= now)
            .order_by(TextMessage.next_attempt_at)
            .limit(limit)
        )
        return list(
            session.scalars(
                update(TextMessage)
                .where(
                    TextMessage.id.in_(due.scalar_subquery()),
                    TextMessage.status == TextStatus.PENDING,
                )
                .values(status=TextStatus.CLAIMED, lease_until=now + LEASE)
                .returning(TextMessage.id)
            )
        )


def release_lapsed(now: datetime, settings: Settings, to: sms.Transport | None = None) -> int:
    """Claims whose worker died go back; a send whose worker died is settled
    by asking the provider whether the message went."""
    to = to or sms.transport(settings)
    with session_scope() as session:
        session.execute(
            update(TextMessage)
            .where(TextMessage.status == TextStatus.CLAIMED, TextMessage.lease_until <= now)
            .values(status=TextStatus.PENDING, lease_until=None)
        )
        lost = session.scalars(
            select(TextMessage).where(
                TextMessage.status == TextStatus.SENDING, TextMessage.lease_until <= now
            )
        ).all()
        for text in lost:
            found = None
            if text.to_number and text.body and text.sending_at:
                try:
                    found = to.sent_since(
                        text.to_number, text.sending_at - timedelta(minutes=1), text.body
                    )
                except Exception as exc:  # noqa: BLE001 - asked again at the next pass
                    log.warning(
                        "sms_in_doubt_unresolved", text_id=text.id, error=type(exc).__name__
                    )
                    continue
            if found is not None:
                text.status, text.provider_id, text.sent_at = TextStatus.SENT, found, now
            else:
                # Not at the provider: it never left us, so it goes once more.
                text.status, text.in_doubt, text.next_attempt_at = TextStatus.PENDING, True, now
            text.lease_until = None
            log.warning("sms_was_in_doubt", text_id=text.id, sent=found is not None)
        return len(lost)


def send_due(now: datetime, settings: Settings, to: sms.Transport | None = None) -> dict[int, str]:
    """Settle lapsed sends, then send every due SMS; outcome per row."""
    to = to or sms.transport(settings)
    release_lapsed(now, settings, to)
    return {text_id: send_one(text_id, now, settings, to) for text_id in claim(now)}


def _settle(text_id: int, status: TextStatus, why: str, **values: object) -> str:
    with session_scope() as session:
        session.execute(
            update(TextMessage)
            .where(TextMessage.id == text_id)
            .values(status=status, last_error=why[:255], lease_until=None, **values)
        )
    return status.value if status is not TextStatus.SKIPPED else f"skipped: {why}"


def _facts(text_id: int, now: datetime) -> tuple[str, object]:
    """What the claimed row is for, or why it is not sent now (one read
    transaction, closed before anything is written: SQLite allows one writer)."""
    with session_scope() as session:
        text = session.get(TextMessage, text_id)
        if text is None or text.status is not TextStatus.CLAIMED:
            return "stale", None
        case = session.get(RecoveryCase, text.case_id) if text.case_id else None
        if case is None or case.status is not CaseStatus.OPEN or case.paused_at is not None:
            return "skip", "the case can no longer act"
        customer = session.get(Customer, case.customer_id) if case.customer_id else None
        tz, locale = (customer.timezone, customer.locale) if customer else (None, None)
        allowed = next_allowed(now, tz)
        if allowed > now:
            return "wait", allowed
        if not case.stripe_customer_id:
            return "skip", "no customer"
        return "go", _Facts(
            case.id,
            case.stripe_customer_id,
            text.template,
            text.step,
            text.in_doubt,
            case.customer_action,
            case.amount_due,
            case.currency,
            case.final_action_at,
            locale,
        )


@dataclass(frozen=True)
class _Facts:
    case_id: int
    stripe_customer: str
    template: str
    step: str
    in_doubt: bool
    action: str | None
    amount: int
    currency: str
    ends: datetime | None
    locale: str | None


def send_one(text_id: int, now: datetime, settings: Settings, to: sms.Transport) -> str:
    verdict, detail = _facts(text_id, now)
    if verdict == "stale":
        return "stale"
    if verdict == "skip":
        return _settle(text_id, TextStatus.SKIPPED, str(detail))
    if verdict == "wait":
        return _settle(text_id, TextStatus.PENDING, "quiet hours", next_attempt_at=detail)
    assert isinstance(detail, _Facts)  # noqa: S101 - "go" carries the facts
    facts = detail
    try:
        known = stripe_api.retrieve_customer(facts.stripe_customer)
    except stripe_api.StripeFailure as exc:
        return _settle(
            text_id,
            TextStatus.PENDING,
            f"Stripe: {type(exc).__name__}",
            next_attempt_at=now + RETRY_AFTER,
        )
    phone = (known.get("phone") or "").replace(" ", "")
    consent = str((known.get("metadata") or {}).get(settings.sms_consent_metadata_key, ""))
    if consent.strip().lower() not in CONSENTED:
        return _settle(text_id, TextStatus.SKIPPED, "no consent to SMS")
    if not sms.E164.fullmatch(phone):
        return _settle(text_id, TextStatus.SKIPPED, "no phone number")
    with session_scope() as session:
        opted_out = session.get(SmsOptOut, phone) is not None
        text = session.get(TextMessage, text_id, with_for_update=True)
        assert text is not None  # noqa: S101 - claimed above
        earlier = (text.to_number, text.body, text.sending_at)
    if opted_out:
        return _settle(text_id, TextStatus.SKIPPED, "the number answered STOP")
    if facts.in_doubt and earlier[0] == phone and earlier[1] and earlier[2]:
        found = to.sent_since(phone, earlier[2] - timedelta(minutes=1), earlier[1])
        if found is not None:
            return _settle(text_id, TextStatus.SENT, "", provider_id=found, sent_at=now)
    with session_scope() as session:
        purpose = standing.link_purpose(facts.action)
        url, _ = links.handed_out(session, purpose, facts.case_id, now, settings, "sms", short=True)
        body = compose(
            facts.template,
            settings,
            i18n.choose(facts.locale),
            url,
            facts.amount,
            facts.currency,
            facts.ends,
        )
        if body is not None:
            # Committed before the provider is called: a crash from here
            # leaves a row release_lapsed settles by asking the provider.
            text = session.get(TextMessage, text_id, with_for_update=True)
            assert text is not None  # noqa: S101 - claimed above
            text.status, text.to_number, text.body = TextStatus.SENDING, phone, body
            text.sending_at, text.attempts = now, text.attempts + 1
            text.lease_until = now + LEASE
            attempts = text.attempts
    if body is None:
        return _settle(text_id, TextStatus.FAILED, "no text fits one SMS")
    callback = f"{settings.public_base_url}/twilio/status"
    try:
        provider_id = to.send(phone, body, callback)
    except sms.SendFailed as failed:
        if failed.permanent or attempts >= MAX_ATTEMPTS:
            return _settle(text_id, TextStatus.FAILED, str(failed))
        return _settle(
            text_id,
            TextStatus.PENDING,
            str(failed),
            in_doubt=True,
            next_attempt_at=now + RETRY_AFTER,
        )
    _settle(text_id, TextStatus.SENT, "", provider_id=provider_id, sent_at=now)
    log.info("sms_sent", text_id=text_id, step=facts.step)
    return TextStatus.SENT.value


def compose(
    template: str,
    settings: Settings,
    locale: str,
    url: str,
    amount: int,
    currency: str,
    ends: datetime | None,
) -> str | None:
    """The SMS in the customer's language, or a shorter one if it would not
    fit one SMS; None if even that does not."""
    from recovery.customers.pages import render_sms

    for name in (template, "_short"):
        body = render_sms(name, settings, locale, url, amount, currency, ends).strip()
        # CLDR writes amounts and dates with no-break spaces, which GSM-7 lacks.
        body = body.replace("\u00a0", " ").replace("\u202f", " ")
        if sms.fits_one_sms(body):
            return body
    return None


# -- what customers answer ------------------------------------------------------------


def answer(phone: str, words: str, now: datetime) -> str:
    """A reply to our number: STOP and its synonyms stop every SMS to the
    number at once, START resumes, HELP asks for help. Which it was."""
    said = words.strip().upper()
    with session_scope() as session:
        if said in STOP_WORDS:
            insert_ignore(session, SmsOptOut, {"phone": phone, "at": now}, ["phone"])
            # What is queued for the number will find it opted out.
            return "stop"
        if said in START_WORDS:
            found = session.get(SmsOptOut, phone)
            if found is not None:
                session.delete(found)
            return "start"
    return "help" if said in HELP_WORDS else "other"


def delivery_reported(provider_id: str, status: str) -> bool:
    """The provider's word on a sent SMS (delivered, undelivered, failed…)."""
    with session_scope() as session:
        changed = session.execute(
            update(TextMessage)
            .where(TextMessage.provider_id == provider_id)
            .values(delivery_status=status[:32])
        )
        return bool(getattr(changed, "rowcount", 0))


def locale_of_number(phone: str) -> str:
    """The language of the customer we last wrote to at `phone`."""
    with session_scope() as session:
        locale = session.scalar(
            select(Customer.locale)
            .join(RecoveryCase, RecoveryCase.customer_id == Customer.id)
            .join(TextMessage, TextMessage.case_id == RecoveryCase.id)
            .where(TextMessage.to_number == phone)
            .order_by(TextMessage.id.desc())
            .limit(1)
        )
    return i18n.choose(locale)
