"""What recovery brought back: rates, revenue, paths, the email funnel, over time.

Read-only over the case, step, message and link tables; what each figure
counts is defined in counts.py. Money stays integer
minor units, summed per currency (a dollar and a yen do not add up). A case's
cause is its first decline: later declines tell the story, not the start.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from statistics import fmean, median, quantiles
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import counts
from recovery.models import (
    CaseStatus,
    Message,
    RecoveryCase,
    RecoveryLink,
    RecoveryPath,
)


def _money(rows: Iterable[tuple[str, int | None]]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for currency, amount in rows:
        totals[currency] += amount or 0
    return dict(sorted(totals.items()))


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _grouped(
    cases: list[RecoveryCase], key: Callable[[RecoveryCase], str | None]
) -> list[dict[str, Any]]:
    groups: dict[str, list[RecoveryCase]] = defaultdict(list)
    for case in cases:
        groups[key(case) or "unknown"].append(case)
    rows = []
    for name, members in groups.items():
        won = [c for c in members if c.status is CaseStatus.RECOVERED]
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


def compute(session: Session, since: datetime | None = None) -> dict[str, Any]:
    query = select(RecoveryCase)
    if since is not None:
        query = query.where(RecoveryCase.opened_at >= since)
    cases = list(session.scalars(query.order_by(RecoveryCase.id)))
    ids = [c.id for c in cases]
    won = [c for c in cases if c.status is CaseStatus.RECOVERED]
    closed = [c for c in cases if c.status is not CaseStatus.OPEN]
    hours = sorted(
        (c.closed_at - (c.first_failed_at or c.opened_at)).total_seconds() / 3600
        for c in won
        if c.closed_at
    )
    retries = counts.retry_steps(session, since)
    sent = session.execute(
        select(Message.case_id, Message.template).where(Message.case_id.in_(ids), counts.is_sent())
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
    by_currency: dict[str, list[RecoveryCase]] = defaultdict(list)
    for case in cases:
        by_currency[case.currency].append(case)
    by_day: dict[str, list[RecoveryCase]] = defaultdict(list)
    for case in won:
        if case.closed_at:
            by_day[case.closed_at.date().isoformat()].append(case)
    return {
        "cases": {"total": len(cases), **counts.cases_by_status(session, since)},
        "at_stake": _money((c.currency, c.amount_due) for c in cases),
        "recovered": {
            "count": len(won),
            "amount": counts.recovered_amounts(session, since),
            "rate": _rate(len(won), len(cases)),
            "rate_of_closed": _rate(len(won), len(closed)),
        },
        "by_currency": [
            {
                "currency": currency,
                "cases": len(members),
                "at_stake": sum(c.amount_due for c in members),
                "recovered": sum(c.amount_recovered or 0 for c in members if c.id in won_ids),
            }
            for currency, members in sorted(by_currency.items())
        ],
        "by_cause": _grouped(cases, lambda c: c.first_category or c.category),
        "by_decline_code": _grouped(cases, lambda c: c.first_decline_code or c.decline_code),
        "by_path": [
            {
                "name": path.value,
                "recovered": sum(1 for c in won if c.recovery_path is path),
                "amount": _money(
                    (c.currency, c.amount_recovered) for c in won if c.recovery_path is path
                ),
            }
            for path in RecoveryPath
        ],
        "by_step": [
            {"name": step, "recovered": count}
            for step, count in Counter(
                c.recovered_by_step for c in won if c.recovered_by_step
            ).most_common()
        ],
        "time_to_recover_hours": {
            "mean": round(fmean(hours), 1) if hours else None,
            "median": round(median(hours), 1) if hours else None,
            "p90": round(quantiles(hours, n=10)[-1], 1) if len(hours) >= 2 else None,
        },
        "retries": {
            "made": retries.made,
            "by_answer": retries.charges,
            "steps_that_charged_nothing": retries.charged_nothing,
            "steps_canceled": retries.canceled,
        },
        "funnel": {
            "cases": len(cases),
            "emailed": len(emailed),
            "emails_sent": len(sent),
            "clicked": len(clicked & emailed),
            "recovered_after_click": len(clicked & won_ids),
            "recovered_emailed": len(emailed & won_ids),
        },
        "emails_by_template": dict(sorted(Counter(t for _, t in sent).items())),
        "by_channel": counts.by_channel(session, ids, won_ids),
        "over_time": [
            {
                "day": day,
                "recovered": len(members),
                "amount": _money((c.currency, c.amount_recovered) for c in members),
            }
            for day, members in sorted(by_day.items())
        ],
    }
