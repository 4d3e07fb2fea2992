"""A retry remembers the slot it ran in (what the retry learner counts) and
every scheduled step why it is due when it is (what `cases show` prints).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("recovery_attempts") as batch:
        batch.add_column(sa.Column("slot", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("why", sa.String(length=400), nullable=True))
        batch.create_index("ix_recovery_attempts_slot", ["slot"])


def downgrade() -> None:
    with op.batch_alter_table("recovery_attempts") as batch:
        batch.drop_index("ix_recovery_attempts_slot")
        batch.drop_column("why")
        batch.drop_column("slot")
