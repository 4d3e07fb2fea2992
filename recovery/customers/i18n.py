"""Customers read their own language: gettext message catalogs, through Babel,
for the emails and the pages they see.

The catalogs are templates/locales/<locale>/messages.po, written by people
and read as they are (compiled in memory when first used, so there is no
build step and an operator's own TEMPLATES_DIR may carry its own). An email
speaks the customer's Stripe locale (`customer.preferred_locales`); a page
speaks what the browser asks for (Accept-Language), since the person on it
may not be the customer Stripe knows. Anything else reads English.
"""

from __future__ import annotations

import gettext
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations
from jinja2 import Environment

ENGLISH = "en"
# The catalogs shipped under templates/locales/, and English, the source.
LOCALES = (ENGLISH, "de", "fr", "es", "pt_BR", "ja")

# Unset: English (the templates' own words).
_speaking: ContextVar[gettext.NullTranslations | None] = ContextVar("speaking", default=None)
_ENGLISH = gettext.NullTranslations()


def choose(tag: str | None) -> str:
    """The catalog for a locale tag ('de-DE', 'pt-BR', 'pt', 'ja', 'fr_CA'):
    the exact one, else the language's, else English."""
    if not tag:
        return ENGLISH
    language, _, region = tag.replace("-", "_").partition("_")
    exact = f"{language.lower()}_{region.upper()}" if region else language.lower()
    if exact in LOCALES:
        return exact
    for locale in LOCALES:
        if locale.split("_")[0] == language.lower():
            return locale
    return ENGLISH


def from_accept_language(header: str | None) -> str:
    """The catalog for a browser's Accept-Language ('fr-CH, fr;q=0.9, en;q=0.8')."""
    wanted: list[tuple[float, int, str]] = []
    for order, part in enumerate((header or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and tag != "*" and quality > 0:
            wanted.append((-quality, order, tag))
    for _quality, _order, tag in sorted(wanted):
        found = choose(tag)
        if found != ENGLISH or tag.lower().startswith("en"):
            return found
    return ENGLISH


@lru_cache(maxsize=32)
def translations(locales_dir: Path, locale: str) -> gettext.NullTranslations:
    """The catalog for `locale`, compiled in memory; English when there is none."""
    source = locales_dir / locale / "messages.po"
    if locale == ENGLISH or not source.is_file():
        return gettext.NullTranslations()
    with source.open("rb") as po:
        catalog = read_po(po, locale=locale)
    compiled = BytesIO()
    write_mo(compiled, catalog, use_fuzzy=False)
    compiled.seek(0)
    return Translations(compiled)


@contextmanager
def speaking(locales_dir: Path, locale: str) -> Iterator[str]:
    """Templates rendered inside read `locale`; yields its language code."""
    token = _speaking.set(translations(locales_dir, locale))
    try:
        yield locale.split("_")[0]
    finally:
        _speaking.reset(token)


def _gettext(message: str) -> str:
    return (_speaking.get() or _ENGLISH).gettext(message)


def _ngettext(singular: str, plural: str, n: int) -> str:
    return (_speaking.get() or _ENGLISH).ngettext(singular, plural, n)


def install(environment: Environment) -> Environment:
    """{% trans %} and _() in `environment`'s templates speak the language
    `speaking` set for this thread or task."""
    environment.add_extension("jinja2.ext.i18n")
    environment.install_gettext_callables(  # type: ignore[attr-defined]
        _gettext, _ngettext, newstyle=True
    )
    return environment
