"""Initial schema: the webhook inbox, customers, cases, and room for attempts,
messages, links and the audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 22:33:35.386562
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("default_payment_method", sa.String(length=255), nullable=True),
        sa.Column("card_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reminders_opted_out_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
        sa.UniqueConstraint("stripe_customer_id", name=op.f("uq_customers_stripe_customer_id")),
    )
    op.create_table(
        "webhook_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("stripe_event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=True),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("api_version", sa.String(length=64), nullable=True),
        sa.Column("stripe_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("stripe_event_id", name=op.f("uq_webhook_events_stripe_event_id")),
    )
    op.create_index(
        "ix_webhook_events_status_available_at",
        "webhook_events",
        ["status", "available_at"],
        unique=False,
    )
    op.create_index("ix_webhook_events_type", "webhook_events", ["type"], unique=False)
    op.create_table(
        "recovery_cases",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("invoice_id", sa.String(length=255), nullable=False),
        sa.Column(
            "customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("amount_due", sa.BigInteger(), nullable=False),
        sa.Column("amount_recovered", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("next_payment_attempt", sa.DateTime(timezone=True), nullable=True),
        sa.Column("hosted_invoice_url", sa.Text(), nullable=True),
        sa.Column("needs_authentication", sa.Boolean(), nullable=False),
        sa.Column("charge_id", sa.String(length=255), nullable=True),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("failure_code", sa.String(length=64), nullable=True),
        sa.Column("decline_code", sa.String(length=64), nullable=True),
        sa.Column("advice_code", sa.String(length=64), nullable=True),
        sa.Column("network_advice_code", sa.String(length=16), nullable=True),
        sa.Column("network_decline_code", sa.String(length=16), nullable=True),
        sa.Column("outcome_type", sa.String(length=32), nullable=True),
        sa.Column("payment_method_id", sa.String(length=255), nullable=True),
        sa.Column("payment_method_type", sa.String(length=32), nullable=True),
        sa.Column("card_brand", sa.String(length=32), nullable=True),
        sa.Column("card_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("card_exp_month", sa.Integer(), nullable=True),
        sa.Column("card_exp_year", sa.Integer(), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_recovery_cases_customer_id_customers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_cases")),
        sa.UniqueConstraint("invoice_id", name=op.f("uq_recovery_cases_invoice_id")),
    )
    op.create_index(
        op.f("ix_recovery_cases_card_fingerprint"),
        "recovery_cases",
        ["card_fingerprint"],
        unique=False,
    )
    op.create_index(
        op.f("ix_recovery_cases_customer_id"), "recovery_cases", ["customer_id"], unique=False
    )
    op.create_index("ix_recovery_cases_status", "recovery_cases", ["status"], unique=False)
    op.create_index(
        op.f("ix_recovery_cases_subscription_id"),
        "recovery_cases",
        ["subscription_id"],
        unique=False,
    )
    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("case_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["recovery_cases.id"], name=op.f("fk_audit_log_case_id_recovery_cases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_case_id"), "audit_log", ["case_id"], unique=False)
    op.create_table(
        "messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("case_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=False),
        sa.Column("template", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["recovery_cases.id"], name=op.f("fk_messages_case_id_recovery_cases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("case_id", "step", name="uq_messages_case_id_step"),
    )
    op.create_table(
        "recovery_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("case_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("executed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["recovery_cases.id"],
            name=op.f("fk_recovery_attempts_case_id_recovery_cases"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_attempts")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_recovery_attempts_idempotency_key")),
    )
    op.create_index(
        op.f("ix_recovery_attempts_case_id"), "recovery_attempts", ["case_id"], unique=False
    )
    op.create_index(
        "ix_recovery_attempts_status_due_at",
        "recovery_attempts",
        ["status", "due_at"],
        unique=False,
    )
    op.create_table(
        "recovery_links",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("case_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_clicked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("click_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["recovery_cases.id"],
            name=op.f("fk_recovery_links_case_id_recovery_cases"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_links")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_recovery_links_token_hash")),
    )
    op.create_index(op.f("ix_recovery_links_case_id"), "recovery_links", ["case_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_recovery_links_case_id"), table_name="recovery_links")
    op.drop_table("recovery_links")
    op.drop_index("ix_recovery_attempts_status_due_at", table_name="recovery_attempts")
    op.drop_index(op.f("ix_recovery_attempts_case_id"), table_name="recovery_attempts")
    op.drop_table("recovery_attempts")
    op.drop_table("messages")
    op.drop_index(op.f("ix_audit_log_case_id"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index(op.f("ix_recovery_cases_subscription_id"), table_name="recovery_cases")
    op.drop_index("ix_recovery_cases_status", table_name="recovery_cases")
    op.drop_index(op.f("ix_recovery_cases_customer_id"), table_name="recovery_cases")
    op.drop_index(op.f("ix_recovery_cases_card_fingerprint"), table_name="recovery_cases")
    op.drop_table("recovery_cases")
    op.drop_index("ix_webhook_events_type", table_name="webhook_events")
    op.drop_index("ix_webhook_events_status_available_at", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_table("customers")
