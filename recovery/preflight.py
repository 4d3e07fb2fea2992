"""What a process checks before it starts work, beyond the environment's
values (config.py): the plans file parses and names only emails that exist,
and the templates directory holds every template the product renders. A
process that would fail every failed-payment event later stops at once."""

from __future__ import annotations

from pathlib import Path

from recovery.config import DEFAULT_TEMPLATES_DIR, ConfigError, Settings
from recovery.engine.plans import PlanFileError, load_plans


def shipped_templates(root: Path = DEFAULT_TEMPLATES_DIR) -> list[str]:
    """Every template the product renders, as shipped: each email's folder,
    the customer pages, the report (the locales are optional)."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and path.parts[len(root.parts)] in ("emails", "pages", "report")
    )


def email_names(root: Path = DEFAULT_TEMPLATES_DIR) -> list[str]:
    """The emails the product can send: one shipped folder each."""
    return sorted(path.name for path in (root / "emails").iterdir() if path.is_dir())


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
    emails = email_names()
    unknown = sorted(named - set(emails))
    if unknown:
        problems.append(
            f"RECOVERY_PLANS_FILE names emails that do not exist: {', '.join(unknown)} "
            f"(emails are: {', '.join(emails)})"
        )
    needed = shipped_templates()
    missing = [name for name in needed if not (settings.templates_dir / name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        problems.append(f"TEMPLATES_DIR={settings.templates_dir} lacks {missing[0]}{more}")
    if problems:
        raise ConfigError(*problems)
