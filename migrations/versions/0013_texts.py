"""SMS to customers, a row per case and step, and the numbers that said STOP.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from recovery.models import BigID, UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "texts",
        sa.Column("id", BigID, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("case_id", BigID, nullable=True),
        sa.Column("step", sa.String(length=64), nullable=False),
        sa.Column("template", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("lease_until", UTCDateTime(timezone=True), nullable=True),
        sa.Column("to_number", sa.String(length=32), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("sending_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("in_doubt", sa.Boolean(), nullable=False),
        sa.Column("provider_id", sa.String(length=64), nullable=True),
        sa.Column("delivery_status", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.String(length=255), nullable=True),
        sa.Column("sent_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["recovery_cases.id"], name=op.f("fk_texts_case_id_recovery_cases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_texts")),
        sa.UniqueConstraint("key", name=op.f("uq_texts_key")),
    )
    op.create_index("ix_texts_case_id", "texts", ["case_id"])
    op.create_index("ix_texts_next_attempt_at", "texts", ["next_attempt_at"])
    op.create_index("ix_texts_provider_id", "texts", ["provider_id"])
    op.create_table(
        "sms_opt_outs",
        sa.Column("phone", sa.String(length=32), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("phone", name=op.f("pk_sms_opt_outs")),
    )


def downgrade() -> None:
    op.drop_table("sms_opt_outs")
    op.drop_index("ix_texts_provider_id", table_name="texts")
    op.drop_index("ix_texts_next_attempt_at", table_name="texts")
    op.drop_index("ix_texts_case_id", table_name="texts")
    op.drop_table("texts")
