"""`recovery plans explain`: what each plan does, and what the retry learner
has learned from this installation's outcomes."""

from __future__ import annotations

from typing import Any

import click

from recovery.cli.common import DatabaseGroup, emit_json
from recovery.config import get_settings
from recovery.db import session_scope
from recovery.engine import learner, planner
from recovery.engine.classify import Category, described
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


def _learned(
    counts: dict[str, learner.Counts], axis: learner.Axis, top: int
) -> list[dict[str, Any]]:
    """The best believed families on the plan's axis, each with its slots of
    most outcomes: the draws weigh families, the outcomes fall in slots."""
    kin = learner.families(counts, axis)
    beliefs = sorted(
        (learner.family_belief(family, kin) for family in kin),
        key=lambda b: (-b.mean, -b.outcomes, b.family),
    )
    found = []
    for held in beliefs[:top]:
        slots = sorted(
            (slot for slot in counts if learner.family_of(slot, axis) == held.family),
            key=lambda slot: (-counts[slot].n, slot),
        )
        found.append(
            {
                "family": held.family,
                "believed_paid_share": round(held.mean, 3),
                "paid": kin[held.family].paid,
                "outcomes": held.outcomes,
                "slots": [
                    {"slot": slot, "paid": counts[slot].paid, "outcomes": counts[slot].n}
                    for slot in slots[:top]
                ],
            }
        )
    return found


_AXES = {
    learner.Axis.PAYDAY: "relation to a payday (a plan of paydays waits on money)",
    learner.Axis.TIME: "days since the failure (a plan of offsets waits on time)",
}

_EXPLAIN_HELP = f"""Each plan's retries, emails, window and final action; then, per plan,
the families of retries that have paid best so far, with their slots. A plan
of paydays learns by a retry's relation to a payday, and moves a retry at
most {learner.LATER_BY.days} days past its payday, and only to a family believed to pay at
least as well as the plan's own; a plan of offsets learns by days since the
failure, and may move a retry to any moment of its window that leaves room
for its later tries, where that raises the case's chance of recovery, with
the tries after it, by {learner.WORTH_MOVING * 100:g} percentage point(s) or more.

A family's believed share is its paid outcomes over a prior of
{learner.PRIOR_OTHER:.0%}, worth {learner.PRIOR_STRENGTH:g} retries; the family of the plan's own
moment starts from {learner.PRIOR_PLAN:.0%} when a case's retry is drawn.

\b
Example:
  recovery plans explain --top 3
"""


@plans.command("explain", help=_EXPLAIN_HELP)
@click.option("--top", default=5, show_default=True, help="Families, and slots of each, shown.")
@click.option("--json", "as_json", is_flag=True)
def explain(top: int, as_json: bool) -> None:
    settings = get_settings()
    rows: list[dict[str, Any]] = []
    with session_scope() as session:
        for category in Category:
            plan = planner.plan_for(category, settings)
            counts = planner.learned_counts(session, category.value) if plan.max_tries else {}
            axis = planner.learner_axis(plan)
            rows.append(
                {
                    "plan": category.value,
                    "retries": _retries(plan),
                    "emails": [f"day {e.day:g}: {e.template}" for e in plan.emails],
                    "sms": [e.template for e in plan.emails if e.template in plan.sms],
                    "window_days": plan.window_days,
                    "final_action": plan.final_action.value,
                    "outcomes": sum(c.n for c in counts.values()),
                    "learns_by": axis.value,
                    "learned": _learned(counts, axis, top),
                }
            )
    if as_json:
        return emit_json({"retry_learning": settings.retry_learning, "plans": rows})
    state = "on" if settings.retry_learning else "off (RETRY_LEARNING=on turns it on)"
    click.echo(f"retry learning: {state}\n")
    for row in rows:
        click.echo(f"{described(row['plan'])}")
        click.echo(f"  retries:  {row['retries']}")
        click.echo(f"  emails:   {'; '.join(row['emails']) or 'none'}")
        click.echo(
            f"  also SMS: {', '.join(dict.fromkeys(row['sms'])) or 'none'}"
            " (to customers who consented)"
        )
        click.echo(f"  window:   {row['window_days']:g} days, then {row['final_action']}")
        if row["retries"] != "none":
            click.echo(
                f"  learned:  from {row['outcomes']} retry outcome(s), by {_AXES[row['learns_by']]}"
            )
            for family in row["learned"]:
                click.echo(
                    f"    family {family['family']:<33} {family['believed_paid_share']:>6.1%}"
                    f" believed ({family['paid']} of {family['outcomes']} paid + prior)"
                )
                for slot in family["slots"]:
                    paid = f"{slot['paid']} of {slot['outcomes']} paid"
                    click.echo(f"      {slot['slot']:<38} {paid}")
        click.echo()
    source = settings.plans_file or "the defaults"
    click.echo(f"{len(rows)} plans in force, from {source}.")


COMMANDS = [plans]
