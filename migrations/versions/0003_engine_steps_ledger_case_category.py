"""The engine: plan steps with leases and claims, the card-network ledger, and
each case's category, mode, anchor, pause and review flag.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 00:41:36.825207
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import recovery.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "card_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("brand", sa.String(length=32), nullable=True),
        sa.Column("attempted_at", recovery.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=False),
        sa.Column("stop", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_card_attempts")),
        sa.UniqueConstraint("reference", name=op.f("uq_card_attempts_reference")),
    )
    with op.batch_alter_table("card_attempts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_card_attempts_fingerprint_attempted_at",
            ["fingerprint", "attempted_at"],
            unique=False,
        )

    with op.batch_alter_table("recovery_attempts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("step", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("tries", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("decline_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.create_index(
            "ix_recovery_attempts_status_lease_until", ["status", "lease_until"], unique=False
        )
        batch_op.create_unique_constraint("uq_recovery_attempts_case_id_step", ["case_id", "step"])

    with op.batch_alter_table("recovery_cases", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("first_failed_at", recovery.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("category", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("mode", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("paused_at", recovery.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("flag_reason", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_recovery_cases_category"), ["category"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("recovery_cases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recovery_cases_category"))
        batch_op.drop_column("flag_reason")
        batch_op.drop_column("paused_at")
        batch_op.drop_column("mode")
        batch_op.drop_column("category")
        batch_op.drop_column("first_failed_at")

    with op.batch_alter_table("recovery_attempts", schema=None) as batch_op:
        batch_op.drop_constraint("uq_recovery_attempts_case_id_step", type_="unique")
        batch_op.drop_index("ix_recovery_attempts_status_lease_until")
        batch_op.drop_column("last_error")
        batch_op.drop_column("decline_code")
        batch_op.drop_column("tries")
        batch_op.drop_column("claims")
        batch_op.drop_column("step")

    with op.batch_alter_table("card_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_card_attempts_fingerprint_attempted_at")

    op.drop_table("card_attempts")
