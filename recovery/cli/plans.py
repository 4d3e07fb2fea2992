"""`recovery plans explain`: what each plan does, and what the retry learner
has learned from this installation's outcomes."""

from __future__ import annotations

from typing import Any

import click

from recovery.cli.common import DatabaseGroup, emit_json
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import learner, planner
from recovery.engine.classify import Category
from recovery.engine.plans import Plan, RetryOn


@click.group(cls=DatabaseGroup)
def plans() -> None:
    """The recovery plans in force."""


def _retries(plan: Plan) -> str:
    if not plan.max_tries:
        return "none"
    if plan.retry_on is RetryOn.PAYDAYS:
        return f"up to {plan.max_tries}, one per common payday (Fridays, 1st, 15th, month end)"
    days = ", ".join(f"{d:g}" for d in plan.retry_days[: plan.max_tries])
    pulled = " (pulled to paydays)" if plan.payday_aware else ""
    return f"{plan.max_tries} on days {days}{pulled}"


@plans.command("explain")
@click.option("--top", default=5, show_default=True, help="Learned slots shown per plan.")
@click.option("--json", "as_json", is_flag=True)
def explain(top: int, as_json: bool) -> None:
    """Each plan's retries, emails, window and final action; then, per plan,
    the slots where retries have paid best so far and how sure that is.

    \b
    Example:
      recovery plans explain --top 3
    """
    settings = get_settings()
    rows: list[dict[str, Any]] = []
    with session_scope() as session:
        for category in Category:
            plan = planner.plan_for(category, settings)
            counts = planner.learned_counts(session, category.value) if plan.max_tries else {}
            kin = learner.families(counts)
            beliefs = sorted(
                (learner.belief(slot, counts, kin) for slot in counts),
                key=lambda b: (-b.mean, -b.outcomes),
            )
            rows.append(
                {
                    "plan": category.value,
                    "retries": _retries(plan),
                    "emails": [f"day {e.day:g}: {e.template}" for e in plan.emails],
                    "window_days": plan.window_days,
                    "final_action": plan.final_action.value,
                    "outcomes": sum(c.n for c in counts.values()),
                    "learned": [
                        {
                            "slot": b.slot,
                            "paid_share": round(b.mean, 3),
                            "outcomes": b.outcomes,
                            "family_outcomes": b.kin,
                        }
                        for b in beliefs[:top]
                    ],
                }
            )
    if as_json:
        return emit_json({"retry_learning": settings.retry_learning, "plans": rows})
    state = "on" if settings.retry_learning else "off (RETRY_LEARNING=on turns it on)"
    click.echo(f"retry learning: {state}\n")
    for row in rows:
        click.echo(f"{row['plan']}")
        click.echo(f"  retries:  {row['retries']}")
        click.echo(f"  emails:   {'; '.join(row['emails']) or 'none'}")
        click.echo(f"  window:   {row['window_days']:g} days, then {row['final_action']}")
        if row["retries"] != "none":
            click.echo(f"  learned:  from {row['outcomes']} retry outcome(s)")
            for item in row["learned"]:
                click.echo(
                    f"    {item['slot']:<40} {item['paid_share']:>6.1%} paid"
                    f" ({item['outcomes']} outcome(s), {item['family_outcomes']} of its"
                    " family + prior)"
                )
        click.echo()


COMMANDS = [plans]
