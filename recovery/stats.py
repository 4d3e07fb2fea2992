"""What recovery brought back: rates, revenue, paths, the email funnel, over time.

Read-only over the case, step, message and link tables. Money stays integer
minor units, summed per currency (a dollar and a yen do not add up). A case's
cause is its first decline: later declines tell the story, not the start.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from statistics import median, quantiles

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery.models import (
    CaseStatus,
    Message,
    RecoveryAttempt,
    RecoveryCase,
    RecoveryLink,
    StepKind,
    StepStatus,
)

PATHS = ("retry", "card_update", "link", "paid_elsewhere")


def _money(rows) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for currency, amount in rows:
        totals[currency] += amount or 0
    return dict(sorted(totals.items()))


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _grouped(cases: list[RecoveryCase], key) -> list[dict]:
    groups: dict[str, list[RecoveryCase]] = defaultdict(list)
    for case in cases:
        groups[key(case) or "unknown"].append(case)
    rows = []
    for name, members in groups.items():
        won = [c for c in members if c.status == CaseStatus.RECOVERED.value]
        rows.append(
            {
                "name": name,
                "cases": len(members),
                "recovered": len(won),
                "rate": _rate(len(won), len(members)),
                "at_stake": _money((c.currency, c.amount_due) for c in members),
                "amount": _money((c.currency, c.amount_recovered) for c in won),
            }
        )
    return sorted(rows, key=lambda r: (-r["cases"], r["name"]))


def compute(session: Session, since: datetime | None = None) -> dict:
    query = select(RecoveryCase)
    if since is not None:
        query = query.where(RecoveryCase.opened_at >= since)
    cases = list(session.scalars(query.order_by(RecoveryCase.id)))
    ids = [c.id for c in cases]
    won = [c for c in cases if c.status == CaseStatus.RECOVERED.value]
    closed = [c for c in cases if c.status != CaseStatus.OPEN.value]
    hours = sorted(
        (c.closed_at - (c.first_failed_at or c.opened_at)).total_seconds() / 3600
        for c in won
        if c.closed_at
    )
    retries = Counter(
        outcome
        for (outcome,) in session.execute(
            select(RecoveryAttempt.outcome).where(
                RecoveryAttempt.case_id.in_(ids),
                RecoveryAttempt.kind == StepKind.RETRY.value,
                RecoveryAttempt.status == StepStatus.DONE.value,
            )
        )
    )
    sent = session.execute(
        select(Message.case_id, Message.template).where(
            Message.case_id.in_(ids), Message.status == "sent"
        )
    ).all()
    emailed = {case_id for case_id, _ in sent}
    clicked = set(
        session.scalars(
            select(RecoveryLink.case_id)
            .where(RecoveryLink.case_id.in_(ids), RecoveryLink.click_count > 0)
            .distinct()
        )
    )
    won_ids = {c.id for c in won}
    by_day: dict[str, list[RecoveryCase]] = defaultdict(list)
    for case in won:
        if case.closed_at:
            by_day[case.closed_at.date().isoformat()].append(case)
    return {
        "cases": {
            "total": len(cases),
            **{s.value: sum(1 for c in cases if c.status == s.value) for s in CaseStatus},
        },
        "at_stake": _money((c.currency, c.amount_due) for c in cases),
        "recovered": {
            "count": len(won),
            "amount": _money((c.currency, c.amount_recovered) for c in won),
            "rate": _rate(len(won), len(cases)),
            "rate_of_closed": _rate(len(won), len(closed)),
        },
        "by_cause": _grouped(cases, lambda c: c.first_category or c.category),
        "by_decline_code": _grouped(cases, lambda c: c.first_decline_code or c.decline_code),
        "by_path": [
            {
                "name": path,
                "recovered": sum(1 for c in won if c.recovery_path == path),
                "amount": _money(
                    (c.currency, c.amount_recovered) for c in won if c.recovery_path == path
                ),
            }
            for path in PATHS
        ],
        "by_step": [
            {"name": step, "recovered": count}
            for step, count in Counter(
                _step_family(c.recovered_by_step) for c in won if c.recovered_by_step
            ).most_common()
        ],
        "time_to_recover_hours": {
            "median": round(median(hours), 1) if hours else None,
            "p90": round(quantiles(hours, n=10)[-1], 1) if len(hours) >= 2 else None,
        },
        "retries": {"made": sum(retries.values()), "by_outcome": dict(sorted(retries.items()))},
        "funnel": {
            "cases": len(cases),
            "emailed": len(emailed),
            "emails_sent": len(sent),
            "clicked": len(clicked & emailed),
            "recovered_after_click": len(clicked & won_ids),
            "recovered_emailed": len(emailed & won_ids),
        },
        "emails_by_template": dict(sorted(Counter(t for _, t in sent).items())),
        "over_time": [
            {
                "day": day,
                "recovered": len(members),
                "amount": _money((c.currency, c.amount_recovered) for c in members),
            }
            for day, members in sorted(by_day.items())
        ],
    }


def _step_family(step: str) -> str:
    """retry:card-update:<time> → retry:card-update; retry:3 stays retry:3."""
    return "retry:card-update" if step.startswith("retry:card-update") else step
