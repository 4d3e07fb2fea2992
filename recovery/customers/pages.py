"""The pages customers see (templates/pages/), rendered in their language,
and the words the notice and the status API say to them."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from babel.dates import format_date
from jinja2 import Environment, FileSystemLoader, select_autoescape

from recovery.config import Settings
from recovery.customers import i18n
from recovery.customers.standing import Standing
from recovery.money import format_money

# The pages customers see (templates/pages/<name>.html); each names its own
# title, in the words of its language.
PAGES = (
    "notice",
    "choose",
    "link_invalid",
    "all_set",
    "card_saved",
    "card_not_saved",
    "opt_out",
    "opt_out_confirm",
    "too_many",
    "unavailable",
)


@lru_cache(maxsize=4)
def _pages(templates_dir: Path) -> Environment:
    pages = i18n.install(
        Environment(
            loader=FileSystemLoader(str(templates_dir / "pages")),
            autoescape=select_autoescape(default=True),
        )
    )
    # Amounts are written in the page's locale, which each render passes.
    pages.globals["format_money"] = format_money
    return pages


def render_page(name: str, settings: Settings, locale: str = i18n.ENGLISH, **values: Any) -> bytes:
    brand = {
        "name": settings.brand_name,
        "support_email": settings.brand_support_email,
        "accent": settings.brand_accent_color,
    }
    page = _pages(settings.templates_dir).get_template(f"{name}.html")
    with i18n.speaking(settings.templates_dir / "locales", locale) as lang:
        return page.render(brand=brand, lang=lang, locale=locale, **values).encode()


def ends_on(standing: Standing, locale: str) -> str | None:
    """The day service ends, written in the customer's language."""
    if standing.service_ends_at is None:
        return None
    return format_date(standing.service_ends_at.date(), format="long", locale=locale)


def standing_words(standing: Standing, settings: Settings, locale: str) -> dict[str, str | None]:
    """What the notice says, sentence by sentence, for an app to show as it is."""
    words = _pages(settings.templates_dir).get_template("_notice_words.html").module
    amount = format_money(standing.amount_due, standing.currency, locale)
    date = ends_on(standing, locale)
    with i18n.speaking(settings.templates_dir / "locales", locale):
        return {
            "locale": locale,
            "headline": str(words.headline()),  # type: ignore[attr-defined]
            "action": str(words.says(standing.action)),  # type: ignore[attr-defined]
            "due": str(words.due(amount)),  # type: ignore[attr-defined]
            "ends": str(words.ends(date)) if date else None,  # type: ignore[attr-defined]
            "button": str(words.button()),  # type: ignore[attr-defined]
        }


@lru_cache(maxsize=4)
def _texts(templates_dir: Path) -> Environment:
    # Plain text: nothing to escape in an SMS.
    return i18n.install(
        Environment(loader=FileSystemLoader(str(templates_dir / "sms")), autoescape=False)  # noqa: S701
    )


def render_sms(
    name: str,
    settings: Settings,
    locale: str,
    link: str,
    amount: int,
    currency: str,
    ends: datetime | None,
) -> str:
    template = _texts(settings.templates_dir).get_template(f"{name}.txt")
    date = format_date(ends.date(), format="long", locale=locale) if ends else None
    with i18n.speaking(settings.templates_dir / "locales", locale):
        return template.render(
            brand=settings.brand_name,
            amount=format_money(amount, currency, locale),
            date=date,
            link=link,
        )


def render_help(settings: Settings, locale: str) -> str:
    """The answer to an SMS that says HELP."""
    template = _texts(settings.templates_dir).get_template("_help.txt")
    with i18n.speaking(settings.templates_dir / "locales", locale):
        return template.render(
            brand=settings.brand_name, email=settings.brand_support_email
        ).strip()
