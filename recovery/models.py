"""Tables, and the status enums their rows move through.

Every status column holds one of its enum's values and reads back as the enum
member; the moves between a case's states live in engine/cases.py. Money is an
integer in the currency's minor unit beside its ISO currency code. Every
timestamp is timezone-aware UTC, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

from recovery import clock


def utcnow() -> datetime:
    return clock.now()


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC in and out; SQLite stores no offset, so it is restored on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Enumerated(TypeDecorator[enum.StrEnum]):
    """A StrEnum kept as its value in a VARCHAR and read back as the member, so
    a value outside the enum can be neither written nor mistaken for a status."""

    impl = String
    cache_ok = True

    def __init__(self, enum_type: type[enum.StrEnum], length: int = 16):
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else self.enum_type(value).value

    def process_result_value(self, value: Any, dialect: Any) -> enum.StrEnum | None:
        return None if value is None else self.enum_type(value)


def coerced(*names: str) -> Any:
    """A validator making a value assigned to these Enumerated columns the enum
    member at once (a plain string would stay a string until reloaded), and
    refusing a value outside the enum where it is assigned."""

    @validates(*names)
    def coerce(self: Any, key: str, value: Any) -> Any:
        column_type = self.__table__.c[key].type
        return None if value is None else column_type.enum_type(value)

    return coerce


# Names for constraints so Alembic migrations are stable across dialects.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT primary keys on PostgreSQL; SQLite only auto-increments INTEGER.
BigID = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class EventStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    PROCESSED = "processed"
    FAILED = "failed"
    IGNORED = "ignored"


class CaseStatus(enum.StrEnum):
    """A recovery case's state; engine/cases.py says where each may go next."""

    OPEN = "open"
    RECOVERED = "recovered"
    CANCELED = "canceled"
    VOIDED = "voided"
    UNCOLLECTIBLE = "uncollectible"


class RetryMode(enum.StrEnum):
    """Who retries a case: Stripe's own schedule while it has one (assist), or us."""

    ASSIST = "assist"
    TAKE_OVER = "take_over"


class RecoveryPath(enum.StrEnum):
    """How a recovered case's money came in."""

    RETRY = "retry"  # a retry of ours, on the plan or an operator's
    CARD_UPDATE = "card_update"  # our retry right after the customer changed the card
    LINK = "link"  # the customer paid through a link of ours
    BACKUP_CARD = "backup_card"  # our retry on another card saved on the customer
    PAID_ELSEWHERE = "paid_elsewhere"  # Stripe's own retry, or paid some other way


class WebhookEvent(Base):
    """The durable inbox: every verified Stripe event, exactly once."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    stripe_event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(255))
    account: Mapped[str | None] = mapped_column(String(255))
    livemode: Mapped[bool] = mapped_column(Boolean)
    api_version: Mapped[str | None] = mapped_column(String(64))
    stripe_created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[EventStatus] = mapped_column(
        Enumerated(EventStatus), default=EventStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # When the relay may hand the event to a worker again (backoff, lease).
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    _enums = coerced("status")

    __table_args__ = (Index("ix_webhook_events_status_available_at", "status", "available_at"),)


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    stripe_customer_id: Mapped[str] = mapped_column(String(255), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(255))
    locale: Mapped[str | None] = mapped_column(String(35))
    timezone: Mapped[str | None] = mapped_column(String(64))
    default_payment_method: Mapped[str | None] = mapped_column(String(255))
    # The card the customer saved through our link, which a retry on a card
    # update pays with explicitly (an invoice's own default would win).
    saved_payment_method: Mapped[str | None] = mapped_column(String(255))
    # Set when Stripe tells us the card changed; the engine retries at once.
    card_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reminders_opted_out_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class RecoveryCase(Base):
    """One failed invoice we are trying to collect."""

    __tablename__ = "recovery_cases"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    invoice_id: Mapped[str] = mapped_column(String(255), unique=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    subscription_id: Mapped[str | None] = mapped_column(String(255), index=True)
    status: Mapped[CaseStatus] = mapped_column(Enumerated(CaseStatus), default=CaseStatus.OPEN)
    livemode: Mapped[bool] = mapped_column(Boolean, default=False)
    amount_due: Mapped[int] = mapped_column(BigInteger)
    amount_recovered: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_payment_attempt: Mapped[datetime | None] = mapped_column(UTCDateTime)
    hosted_invoice_url: Mapped[str | None] = mapped_column(Text)
    needs_authentication: Mapped[bool] = mapped_column(Boolean, default=False)
    # The decline, as the card network and Stripe reported it.
    charge_id: Mapped[str | None] = mapped_column(String(255))
    payment_intent_id: Mapped[str | None] = mapped_column(String(255))
    failure_code: Mapped[str | None] = mapped_column(String(64))
    decline_code: Mapped[str | None] = mapped_column(String(64))
    advice_code: Mapped[str | None] = mapped_column(String(64))
    network_advice_code: Mapped[str | None] = mapped_column(String(16))
    network_decline_code: Mapped[str | None] = mapped_column(String(16))
    outcome_type: Mapped[str | None] = mapped_column(String(32))
    payment_method_id: Mapped[str | None] = mapped_column(String(255))
    payment_method_type: Mapped[str | None] = mapped_column(String(32))
    card_brand: Mapped[str | None] = mapped_column(String(32))
    card_fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    card_last4: Mapped[str | None] = mapped_column(String(4))
    card_exp_month: Mapped[int | None] = mapped_column(Integer)
    card_exp_year: Mapped[int | None] = mapped_column(Integer)
    # Stripe's `created` of the newest failure applied, so a stale one is not.
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Stripe's `created` of the first failure: the anchor of the plan.
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Why it first failed, kept for the reports: later declines change the rest.
    first_decline_code: Mapped[str | None] = mapped_column(String(64))
    first_category: Mapped[str | None] = mapped_column(String(32))
    # How it was recovered, and by which step of ours (its label, as
    # engine/steps.py names it: retry:2, card_update, operator).
    recovery_path: Mapped[RecoveryPath | None] = mapped_column(Enumerated(RecoveryPath))
    recovered_by_step: Mapped[str | None] = mapped_column(String(64))
    # The engine's reading of the decline (classify.Category) and who retries
    # (assist: Stripe's own retries run; take_over: we retry).
    category: Mapped[str | None] = mapped_column(String(32), index=True)
    mode: Mapped[RetryMode | None] = mapped_column(Enumerated(RetryMode))
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # What the business has been told (business/announce.py): the sequence
    # number of the case's last event, what the customer must do, and when
    # the plan's final action comes.
    announced: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    customer_action: Mapped[str | None] = mapped_column(String(32))
    final_action_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    flag_reason: Mapped[str | None] = mapped_column(String(255))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    _enums = coerced("status", "mode", "recovery_path")

    __table_args__ = (Index("ix_recovery_cases_status", "status"),)


class StepKind(enum.StrEnum):
    RETRY = "retry"
    EMAIL = "email"
    FINAL = "final"


class StepStatus(enum.StrEnum):
    """scheduled ─claim─▶ claimed ─start─▶ executing ─▶ done | canceled
    (a claim or execution whose lease ran out is claimed again)"""

    SCHEDULED = "scheduled"
    CLAIMED = "claimed"
    EXECUTING = "executing"
    DONE = "done"
    CANCELED = "canceled"


class StepOrigin(enum.StrEnum):
    """Why a step exists: the case's plan, a card the customer changed, an operator."""

    PLAN = "plan"
    CARD_UPDATE = "card_update"
    OPERATOR = "operator"
    BACKUP_CARD = "backup_card"  # another card saved on the customer, once the plan's are spent


class StepOutcome(enum.StrEnum):
    """What became of a step (a retry, an email or the final action)."""

    PAID = "paid"
    DECLINED = "declined"
    QUEUED = "queued"  # an email step: its email is in the outbox
    CANCELED = "canceled"  # the plan changed or the case closed before it ran
    SKIPPED_CLOSED = "skipped_closed"
    SKIPPED_PAUSED = "skipped_paused"
    INVOICE_PAID = "invoice_paid"  # found settled at Stripe before acting
    INVOICE_VOID = "invoice_void"
    INVOICE_UNCOLLECTIBLE = "invoice_uncollectible"
    INVOICE_NOT_OPEN = "invoice_not_open"
    BLOCKED_STOP_CODE = "blocked_stop_code"
    # The card that declined for a reason only the customer can fix, again.
    BLOCKED_SAME_CARD = "blocked_same_card"
    SUBSCRIPTION_CANCELED = "subscription_canceled"  # found ended at Stripe
    NO_BACKUP_CARD = "no_backup_card"  # no other card on the customer may be tried
    DEFERRED_NETWORK_LIMIT = "deferred_network_limit"
    DEFERRED_UNAVAILABLE = "deferred_unavailable"
    DEFERRED_FOR_RETRY = "deferred_for_retry"  # an email waits for a retry's answer
    FAILED_UNAVAILABLE = "failed_unavailable"
    REJECTED = "rejected"
    # The final action, by what it did.
    CANCEL_SUBSCRIPTION = "cancel_subscription"
    MARK_UNCOLLECTIBLE = "mark_uncollectible"
    LEAVE_PAST_DUE = "leave_past_due"


class MessageStatus(enum.StrEnum):
    """pending ─claim─▶ claimed ─(checks, link, render)─▶ sending ─SMTP─▶ sent
    claimed → skipped (no longer to be sent) or failed (cannot be prepared);
    a transient failure goes back to pending with a backoff; sending without
    an answer (in doubt) goes back to pending once, then to failed."""

    PENDING = "pending"
    CLAIMED = "claimed"
    SENDING = "sending"
    SENT = "sent"
    SKIPPED = "skipped"
    FAILED = "failed"


class LinkPurpose(enum.StrEnum):
    PAY = "pay"
    UPDATE_CARD = "update_card"
    AUTHENTICATE = "authenticate"
    OPT_OUT = "opt_out"


class LinkRevoked(enum.StrEnum):
    """Why a link stopped working before its expiry."""

    CLOSED = "closed"  # its case closed
    SUPERSEDED = "superseded"  # a newer link for the same owner and purpose
    OPERATOR = "operator"


class CardAttemptSource(enum.StrEnum):
    STRIPE = "stripe"  # Stripe's own attempt, told by a webhook
    RECOVERY = "recovery"  # a retry of ours


class RecoveryAttempt(Base):
    """A step of a case with its due time: a retry, an email or the final action.

    Its kind, origin, number and template are columns; `step` is its name,
    unique per case (so planning twice schedules once), shown to operators
    and never parsed."""

    __tablename__ = "recovery_attempts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    kind: Mapped[StepKind] = mapped_column(Enumerated(StepKind))
    step: Mapped[str] = mapped_column(String(64))
    origin: Mapped[StepOrigin] = mapped_column(Enumerated(StepOrigin), default=StepOrigin.PLAN)
    # The plan's retry or email number (1-based retries, 0-based emails).
    number: Mapped[int | None] = mapped_column(Integer)
    # An email step's template (templates/emails/<template>/).
    template: Mapped[str | None] = mapped_column(String(64))
    # An operator's retry past the rules, with a reason in the audit log.
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[StepStatus] = mapped_column(Enumerated(StepStatus), default=StepStatus.SCHEDULED)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Bumped by every claim: an executor acts only on the claim it was given.
    claims: Mapped[int] = mapped_column(Integer, default=0)
    # Transient failures (Stripe 429/5xx, timeouts) of this same step.
    tries: Mapped[int] = mapped_column(Integer, default=0)
    # Sent with Invoice.pay: the same on every re-execution of this step.
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    outcome: Mapped[StepOutcome | None] = mapped_column(Enumerated(StepOutcome, 64))
    decline_code: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    executed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A plan retry that reached the issuer: the slot the learner counts it in.
    slot: Mapped[str | None] = mapped_column(String(64), index=True)
    # Why the step is due when it is, in words for operators.
    why: Mapped[str | None] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    _enums = coerced("kind", "origin", "status", "outcome")

    __table_args__ = (
        UniqueConstraint("case_id", "step", name="uq_recovery_attempts_case_id_step"),
        Index("ix_recovery_attempts_status_due_at", "status", "due_at"),
        Index("ix_recovery_attempts_status_lease_until", "status", "lease_until"),
    )


class CardAttempt(Base):
    """The network ledger: every charge attempt on a card, Stripe's and ours."""

    __tablename__ = "card_attempts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    brand: Mapped[str | None] = mapped_column(String(32))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[CardAttemptSource] = mapped_column(Enumerated(CardAttemptSource))
    # The charge id, so the webhook and our own record of one charge count once.
    reference: Mapped[str] = mapped_column(String(255), unique=True)
    # A stop code: no network allows another attempt on this card.
    stop: Mapped[bool] = mapped_column(Boolean, default=False)

    _enums = coerced("source")

    __table_args__ = (
        Index("ix_card_attempts_fingerprint_attempted_at", "fingerprint", "attempted_at"),
    )


class Message(Base):
    """An email in the outbox: at most one per key (a case's plan step, or a
    card and expiry for pre-dunning), so no step is ever sent twice."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(160), unique=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    step: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(64))
    # The card a pre-dunning email is about (a case's email reads its case's).
    card_brand: Mapped[str | None] = mapped_column(String(32))
    card_last4: Mapped[str | None] = mapped_column(String(4))
    card_exp_month: Mapped[int | None] = mapped_column(Integer)
    card_exp_year: Mapped[int | None] = mapped_column(Integer)
    # A permanent failure is never resent; one in doubt once, with its
    # Message-ID: a step reaches the customer once.
    status: Mapped[MessageStatus] = mapped_column(
        Enumerated(MessageStatus), default=MessageStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    smtp_message_id: Mapped[str | None] = mapped_column(String(255))
    # Handed to the server without its answer: sent once more with the same
    # Message-ID (mail systems drop the copy), and if in doubt again, failed.
    in_doubt: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    _enums = coerced("status")

    __table_args__ = (Index("ix_messages_status_next_attempt_at", "status", "next_attempt_at"),)


class RecoveryLink(Base):
    """A customer's one-click link; only the SHA-256 of its token is kept."""

    __tablename__ = "recovery_links"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    # A case's link, or (pre-dunning, opt-out) only a customer's.
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[LinkPurpose] = mapped_column(Enumerated(LinkPurpose))
    # Where it was handed out: email, sms, notice, app (the status API), webhook.
    channel: Mapped[str] = mapped_column(String(16), default="email", server_default="email")
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[LinkRevoked | None] = mapped_column(Enumerated(LinkRevoked))
    first_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    click_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    _enums = coerced("purpose", "revoked_reason")


class AuditEntry(Base):
    """Who did what to a case, and why. Holds no personal data."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @classmethod
    def of(cls, case: RecoveryCase | None, actor: str, action: str, **detail: Any) -> AuditEntry:
        """An entry about `case`; `detail` holds ids and codes, never personal data."""
        return cls(case_id=case.id if case else None, actor=actor, action=action, detail=detail)


class SyncCursor(Base):
    """Where a backfill got to, so an interrupted one resumes there."""

    __tablename__ = "sync_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[str | None] = mapped_column(String(255))
    seen: Mapped[int] = mapped_column(Integer, default=0)
    queued: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EndpointStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class Endpoint(Base):
    """A URL of the business's that hears about its cases, signed with its secret."""

    __tablename__ = "endpoints"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text)
    # The event types it hears; None for all of them.
    events: Mapped[list[str] | None] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))
    # After a rotation the old secret signs beside the new one until then.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[EndpointStatus] = mapped_column(
        Enumerated(EndpointStatus), default=EndpointStatus.ENABLED
    )
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    # The first failed attempt since the last delivered one.
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    _enums = coerced("status")


class Announcement(Base):
    """An event told to the business's endpoints, written in the transaction
    of the change it reports. Its public id is the `webhook-id` of every
    delivery and every attempt of it."""

    __tablename__ = "announcements"
    __table_args__ = (UniqueConstraint("case_id", "sequence"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    # The case's own count of events, so a receiver can order them.
    sequence: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt of the schedule failed, or its endpoint is gone


class Delivery(Base):
    """One announcement owed to one endpoint, delivered at least once."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "announcement_id"),
        Index("ix_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id"), index=True)
    announcement_id: Mapped[int] = mapped_column(ForeignKey("announcements.id"))
    status: Mapped[DeliveryStatus] = mapped_column(
        Enumerated(DeliveryStatus), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(255))
    # The endpoint's answer, its first KiB.
    response_body: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    _enums = coerced("status")


class AlertState(Base):
    """One condition operators are alerted to: whether it holds, since when,
    and when they were last told, so each alerts at most once an hour and
    says when it clears."""

    __tablename__ = "alert_states"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    firing: Mapped[bool] = mapped_column(Boolean, default=False)
    detail: Mapped[str | None] = mapped_column(String(400))
    since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiKey(Base):
    """A key the business's app calls the status API with. Only a hash of its
    secret part is kept; the whole key is shown once, when made."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    # What it may read: "status" (a customer's standing), "links" (a fresh
    # link to fix it, in the same answer).
    scopes: Mapped[list[str]] = mapped_column(JSON)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TextStatus(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    SENDING = "sending"  # committed before the provider is called
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # not ours to send: no consent, opted out, the case moved on


class TextMessage(Base):
    """An SMS to a customer, a row per case and step, sent at most once
    (customers/texting.py)."""

    __tablename__ = "texts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(160), unique=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    step: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(64))
    status: Mapped[TextStatus] = mapped_column(Enumerated(TextStatus), default=TextStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The number it went to (E.164), kept to ask the provider after a crash.
    to_number: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[str | None] = mapped_column(Text)
    sending_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    in_doubt: Mapped[bool] = mapped_column(Boolean, default=False)
    provider_id: Mapped[str | None] = mapped_column(String(64), index=True)
    delivery_status: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(String(255))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    _enums = coerced("status")


class SmsOptOut(Base):
    """A number that answered STOP: nothing is sent to it until it answers START."""

    __tablename__ = "sms_opt_outs"

    phone: Mapped[str] = mapped_column(String(32), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
