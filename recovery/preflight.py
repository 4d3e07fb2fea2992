"""What a process checks before it starts work, beyond the environment's
values (config.py): the plans file parses and names only emails that exist,
and the templates directory holds every template the product renders. A
process that would fail every failed-payment event later stops at once."""

from __future__ import annotations

from recovery.config import ConfigError, Settings
from recovery.customers.emails import NAMES
from recovery.engine.plans import PlanFileError, load_plans
from recovery.web import PAGES


def check(settings: Settings) -> None:
    """Raise ConfigError, naming the variables, when plans or templates are
    unusable: both problems at once when both are."""
    problems = []
    try:
        plans = load_plans(settings.plans_file)
    except PlanFileError as exc:
        problems.append(f"RECOVERY_PLANS_FILE: {exc}")
        plans = {}
    named = {step.template for plan in plans.values() for step in plan.emails}
    unknown = sorted(named - set(NAMES))
    if unknown:
        problems.append(
            f"RECOVERY_PLANS_FILE names emails that do not exist: {', '.join(unknown)} "
            f"(emails are: {', '.join(NAMES)})"
        )
    needed = [
        "emails/_base.html",
        "emails/_base.txt",
        *(f"emails/{name}/{part}" for name in NAMES for part in _EMAIL_PARTS),
        *(f"pages/{name}.html" for name in PAGES),
        "report/report.html",
    ]
    missing = [name for name in needed if not (settings.templates_dir / name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        problems.append(f"TEMPLATES_DIR={settings.templates_dir} lacks {missing[0]}{more}")
    if problems:
        raise ConfigError(*problems)


_EMAIL_PARTS = ("subject.txt", "body.txt", "body.html")
