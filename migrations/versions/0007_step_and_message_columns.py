"""A step's origin, number, template and forcing, and a pre-dunning email's
card, as columns of their own instead of a name to parse.

Rows written before this revision are read apart here, once: step names were
`retry:<n>`, `retry:card-update:<t>`, `retry:manual:<t>`, `retry:forced:<t>`,
`email:<category>:<n>` and `final`; pre-dunning messages named their card as
`card_expiring:<brand>:<last4>:<year>-<month>`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 18:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The email templates of each plan as they stood at this revision, so that
# email steps scheduled before it keep the template they were planned with.
_PLAN_EMAILS = {
    "retry": ("payment_failed", "payment_failed", "final_notice"),
    "retry_capped": ("payment_failed", "card_update_needed", "final_notice"),
    "customer_action": ("card_update_needed",) * 3 + ("final_notice",),
    "dead_card": ("card_update_needed",) * 3 + ("final_notice",),
    "authenticate": ("authentication_required",) * 3 + ("final_notice",),
    "check_paid": ("payment_failed",),
}


def upgrade() -> None:
    with op.batch_alter_table("recovery_attempts") as batch:
        batch.add_column(
            sa.Column("origin", sa.String(length=16), nullable=False, server_default="plan")
        )
        batch.add_column(sa.Column("number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("template", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("forced", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("card_brand", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("card_last4", sa.String(length=4), nullable=True))
        batch.add_column(sa.Column("card_exp_month", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("card_exp_year", sa.Integer(), nullable=True))

    conn = op.get_bind()
    steps = sa.table(
        "recovery_attempts",
        sa.column("id", sa.Integer),
        sa.column("step", sa.String),
        sa.column("origin", sa.String),
        sa.column("number", sa.Integer),
        sa.column("template", sa.String),
        sa.column("forced", sa.Boolean),
    )
    for step_id, name in conn.execute(sa.select(steps.c.id, steps.c.step)).all():
        values = _step_columns(name)
        if values:
            conn.execute(sa.update(steps).where(steps.c.id == step_id).values(**values))

    # Recoveries name the step that made them by its label, not its full name.
    recovered = sa.table("recovery_cases", sa.column("recovered_by_step", sa.String))
    for pattern, label in (
        ("retry:card-update:%", "retry:card-update"),
        ("retry:manual:%", "retry:operator"),
        ("retry:forced:%", "retry:operator"),
    ):
        conn.execute(
            sa.update(recovered)
            .where(recovered.c.recovered_by_step.like(pattern))
            .values(recovered_by_step=label)
        )

    messages = sa.table(
        "messages",
        sa.column("id", sa.Integer),
        sa.column("step", sa.String),
        sa.column("card_brand", sa.String),
        sa.column("card_last4", sa.String),
        sa.column("card_exp_month", sa.Integer),
        sa.column("card_exp_year", sa.Integer),
    )
    expiring = sa.select(messages.c.id, messages.c.step).where(
        messages.c.step.like("card_expiring:%")
    )
    for message_id, name in conn.execute(expiring).all():
        _, brand, last4, expiry = name.split(":", 3)
        year, month = (int(part) for part in expiry.split("-"))
        conn.execute(
            sa.update(messages)
            .where(messages.c.id == message_id)
            .values(
                step="card_expiring",
                card_brand=brand,
                card_last4=last4 or None,
                card_exp_month=month,
                card_exp_year=year,
            )
        )


def _step_columns(name: str) -> dict:
    parts = name.split(":")
    if parts[0] == "retry" and len(parts) == 2 and parts[1].isdigit():
        return {"number": int(parts[1])}
    if parts[0] == "retry" and parts[1] == "card-update":
        return {"origin": "card_update"}
    if parts[0] == "retry" and parts[1] in ("manual", "forced"):
        return {"origin": "operator", "forced": parts[1] == "forced"}
    if parts[0] == "email" and len(parts) == 3 and parts[2].isdigit():
        number = int(parts[2])
        templates = _PLAN_EMAILS.get(parts[1], ())
        template = templates[number] if number < len(templates) else "payment_failed"
        return {"number": number, "template": template}
    return {}


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("card_exp_year")
        batch.drop_column("card_exp_month")
        batch.drop_column("card_last4")
        batch.drop_column("card_brand")
    with op.batch_alter_table("recovery_attempts") as batch:
        batch.drop_column("forced")
        batch.drop_column("template")
        batch.drop_column("number")
        batch.drop_column("origin")
