"""Dunning emails: what each says, rendered from templates/emails/<name>/.

Each email is a subject, a plain-text body and an HTML body sharing one
layout (`_base.txt`, `_base.html`); the HTML's stylesheet is inlined, since
most mail clients drop <style>. Amounts and dates are written for the
customer's locale and time zone, and the words in its language (i18n.py).
Pure: the outbox gathers the facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import css_inline
from babel.dates import format_date, format_skeleton
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from recovery.config import Settings
from recovery.customers import i18n
from recovery.models import LinkPurpose
from recovery.money import format_money, locale_or_default

NAMES = (
    "payment_failed",
    "card_update_needed",
    "authentication_required",
    "final_notice",
    "recovered",
    "card_expiring",
)
# Everything but the thank-you is a reminder: it carries an opt-out link and
# is not sent to a customer who opted out.
REMINDERS = frozenset(NAMES) - {"recovered"}


def link_purpose(template: str, category: str | None) -> LinkPurpose | None:
    """Where the email's button leads: the purpose of its recovery link."""
    if template == "recovered":
        return None
    if template == "authentication_required" or category == "authenticate":
        return LinkPurpose.AUTHENTICATE
    return LinkPurpose.UPDATE_CARD


@dataclass(frozen=True)
class Card:
    brand: str
    last4: str
    expires: str | None = None


@dataclass(frozen=True)
class Facts:
    """What an email needs to know, already in the customer's terms."""

    amount: int
    currency: str
    locale: str | None = None
    timezone: str | None = None
    customer_name: str | None = None
    category: str | None = None
    decline_code: str | None = None
    card_brand: str | None = None
    card_last4: str | None = None
    card_exp_month: int | None = None
    card_exp_year: int | None = None
    next_retry_at: datetime | None = None
    final_at: datetime | None = None
    final_action: str | None = None
    action_url: str | None = None
    opt_out_url: str | None = None


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


@lru_cache(maxsize=4)
def _environments(templates_dir: Path) -> tuple[Environment, Environment]:
    loader = FileSystemLoader(str(templates_dir / "emails"))
    html = i18n.install(
        Environment(
            loader=loader,
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            autoescape=select_autoescape(default=True),
        )
    )
    text = i18n.install(
        Environment(
            loader=loader,
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,  # noqa: S701 - plain text, never HTML
        )
    )
    return html, text


_INLINER = css_inline.CSSInliner(keep_style_tags=False, load_remote_stylesheets=False)


def _local_date(moment: datetime, timezone: str | None, locale) -> str:
    try:
        zone = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    return format_date(moment.astimezone(zone).date(), format="long", locale=locale)


def _first_name(name: str | None) -> str | None:
    return name.split()[0] if name and name.split() else None


def context(facts: Facts, settings: Settings) -> dict:
    locale = locale_or_default(facts.locale)
    card = None
    if facts.card_last4:
        expires = None
        if facts.card_exp_month and facts.card_exp_year:
            expires = format_skeleton(
                "yMMMM", datetime(facts.card_exp_year, facts.card_exp_month, 1), locale=locale
            )
        card = Card((facts.card_brand or "card").title(), facts.card_last4, expires)
    return {
        "lang": locale.language,
        "brand": {
            "name": settings.brand_name,
            "support_email": settings.brand_support_email,
            "logo_url": settings.brand_logo_url,
            "accent": settings.brand_accent_color,
        },
        "customer": {"name": _first_name(facts.customer_name)},
        "amount": format_money(facts.amount, facts.currency, locale),
        "card": card,
        "category": facts.category,
        "decline_code": facts.decline_code,
        "next_retry": (
            _local_date(facts.next_retry_at, facts.timezone, locale)
            if facts.next_retry_at
            else None
        ),
        "final": (
            {
                "date": _local_date(facts.final_at, facts.timezone, locale),
                "action": facts.final_action,
            }
            if facts.final_at
            else None
        ),
        "action_url": facts.action_url,
        "opt_out_url": facts.opt_out_url,
    }


def render(name: str, facts: Facts, settings: Settings) -> Rendered:
    if name not in NAMES:
        raise ValueError(f"no email called {name!r}; there are: {', '.join(NAMES)}")
    html_env, text_env = _environments(settings.templates_dir)
    values = context(facts, settings)
    with i18n.speaking(settings.templates_dir / "locales", i18n.choose(facts.locale)) as lang:
        values["lang"] = lang
        subject = " ".join(text_env.get_template(f"{name}/subject.txt").render(values).split())
        text = text_env.get_template(f"{name}/body.txt").render(values).strip() + "\n"
        html = html_env.get_template(f"{name}/body.html").render(values, subject=subject)
    return Rendered(subject=subject, text=_tidy(text), html=_INLINER.inline(html))


def _tidy(text: str) -> str:
    """At most one blank line in a row: template tags leave empty lines behind."""
    lines: list[str] = []
    blank = False
    for line in text.splitlines():
        if not line.strip():
            if not blank and lines:
                lines.append("")
            blank = True
            continue
        lines.append(line.rstrip())
        blank = False
    return "\n".join(lines).strip() + "\n"


def sample_facts(
    name: str,
    locale: str = "en_US",
    currency: str = "usd",
    base_url: str = "https://billing.example.com",
) -> Facts:
    """Realistic made-up facts for previews and test sends; links on `base_url`
    (the installation's PUBLIC_BASE_URL), as the real emails' are."""
    base = base_url.rstrip("/")
    now = datetime.now().astimezone()
    amounts = {"jpy": 1500, "krw": 19000}
    category = {
        "authentication_required": "authenticate",
        "card_update_needed": "customer_action",
    }.get(name, "retry")
    return Facts(
        amount=amounts.get(currency.lower(), 2900),
        currency=currency,
        locale=locale,
        timezone="Europe/Paris",
        customer_name="Jenny Rosen",
        category=category,
        decline_code={"card_update_needed": "expired_card"}.get(name, "insufficient_funds"),
        card_brand="visa",
        card_last4="4242",
        card_exp_month=now.month,
        card_exp_year=now.year,
        next_retry_at=now.replace(day=1, month=now.month % 12 + 1, year=now.year + now.month // 12),
        final_at=now.replace(year=now.year + 1, month=1, day=15),
        final_action="cancel_subscription",
        action_url=(f"{base}/r/sample-link-token" if link_purpose(name, category) else None),
        opt_out_url=(f"{base}/u/sample-opt-out-token" if name in REMINDERS else None),
    )
