"""Tables, and the recovery case's states with the moves allowed between them.

Money is an integer in the currency's minor unit beside its ISO currency code.
Every timestamp is timezone-aware UTC, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from recovery import clock


def utcnow() -> datetime:
    return clock.now()


class UTCDateTime(TypeDecorator):
    """Aware UTC in and out; SQLite stores no offset, so it is restored on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        return value.astimezone(UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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
    """A recovery case's state. NEXT lists where each state may go."""

    OPEN = "open"
    RECOVERED = "recovered"
    CANCELED = "canceled"
    VOIDED = "voided"
    UNCOLLECTIBLE = "uncollectible"


CASE_NEXT: dict[CaseStatus, frozenset[CaseStatus]] = {
    CaseStatus.OPEN: frozenset(
        {CaseStatus.RECOVERED, CaseStatus.CANCELED, CaseStatus.VOIDED, CaseStatus.UNCOLLECTIBLE}
    ),
    # Stripe lets an uncollectible invoice still be paid or voided later.
    CaseStatus.UNCOLLECTIBLE: frozenset({CaseStatus.RECOVERED, CaseStatus.VOIDED}),
    # A subscription canceled while its invoice stays payable can still be paid.
    CaseStatus.CANCELED: frozenset({CaseStatus.RECOVERED, CaseStatus.VOIDED}),
    CaseStatus.RECOVERED: frozenset(),
    CaseStatus.VOIDED: frozenset(),
}


def can_move(current: CaseStatus | str, target: CaseStatus | str) -> bool:
    return CaseStatus(target) in CASE_NEXT[CaseStatus(current)]


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
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # When the relay may hand the event to a worker again (backoff, lease).
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

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
    status: Mapped[str] = mapped_column(String(16), default=CaseStatus.OPEN)
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
    # How it was recovered: retry | card_update | link | paid_elsewhere, and by
    # which plan step (retry:2, retry:card-update:…) when ours.
    recovery_path: Mapped[str | None] = mapped_column(String(16))
    recovered_by_step: Mapped[str | None] = mapped_column(String(64))
    # The engine's reading of the decline (classify.Category) and who retries
    # (assist: Stripe's own retries run; take_over: we retry).
    category: Mapped[str | None] = mapped_column(String(32), index=True)
    mode: Mapped[str | None] = mapped_column(String(16))
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    flag_reason: Mapped[str | None] = mapped_column(String(255))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

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


class RecoveryAttempt(Base):
    """A step of a case's plan with its due time: a retry, an email or the final
    action. Unique per case and step name, so planning twice schedules once."""

    __tablename__ = "recovery_attempts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=StepStatus.SCHEDULED)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Bumped by every claim: an executor acts only on the claim it was given.
    claims: Mapped[int] = mapped_column(Integer, default=0)
    # Transient failures (Stripe 429/5xx, timeouts) of this same step.
    tries: Mapped[int] = mapped_column(Integer, default=0)
    # Sent with Invoice.pay: the same on every re-execution of this step.
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    outcome: Mapped[str | None] = mapped_column(String(64))
    decline_code: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    executed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

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
    source: Mapped[str] = mapped_column(String(16))  # stripe | recovery
    # The charge id, so the webhook and our own record of one charge count once.
    reference: Mapped[str] = mapped_column(String(255), unique=True)
    # A stop code: no network allows another attempt on this card.
    stop: Mapped[bool] = mapped_column(Boolean, default=False)

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
    # pending → sending → sent | skipped | failed (permanent, or a worker lost
    # mid-send: never resent, so a step is delivered at most once).
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    smtp_message_id: Mapped[str | None] = mapped_column(String(255))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_messages_status_next_attempt_at", "status", "next_attempt_at"),)


class RecoveryLink(Base):
    """A customer's one-click link; only the SHA-256 of its token is kept."""

    __tablename__ = "recovery_links"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    # A case's link, or (pre-dunning, opt-out) only a customer's.
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # closed | superseded | operator
    revoked_reason: Mapped[str | None] = mapped_column(String(16))
    first_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    click_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEntry(Base):
    """Who did what to a case, and why. Holds no personal data."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("recovery_cases.id"), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


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
