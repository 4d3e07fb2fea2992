"""Which channel handed a link out, so clicks and recoveries count by channel.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("recovery_links") as batch:
        batch.add_column(
            sa.Column("channel", sa.String(length=16), server_default="email", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("recovery_links") as batch:
        batch.drop_column("channel")
