"""Customers read their own language: every message of every email and page
is in every catalog, the emails speak the customer's Stripe locale, the
pages the browser's, and the brand reads right in every subject."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from recovery.config import load_settings
from recovery.customers import emails, i18n

from .conftest import ROOT

TEMPLATES = ROOT / "templates"
TRANSLATED = [locale for locale in i18n.LOCALES if locale != i18n.ENGLISH]
PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def template_messages() -> set[str]:
    methods = [
        (pattern, "jinja2.ext:babel_extract")
        for pattern in (
            "emails/**.txt",
            "emails/**.html",
            "emails/**.j2",
            "pages/**.html",
            "sms/**.txt",
        )
    ]
    options = {"**": {"extensions": "jinja2.ext.i18n"}}
    return {
        message
        for _file, _line, message, _comments, _context in extract_from_dir(
            str(TEMPLATES), methods, options
        )
    }


def catalog(path: Path):
    with path.open("rb") as po:
        return read_po(po)


def test_every_message_of_every_template_is_in_every_catalog_and_translated():
    wanted = template_messages()
    assert len(wanted) > 60
    template = {m.id for m in catalog(TEMPLATES / "locales" / "messages.pot") if m.id}
    assert template == wanted, "regenerate messages.pot"
    for locale in TRANSLATED:
        found = {m.id: m for m in catalog(TEMPLATES / "locales" / locale / "messages.po") if m.id}
        assert set(found) == wanted, (locale, wanted ^ set(found))
        for message_id, message in found.items():
            assert message.string and not message.fuzzy, (locale, message_id)
            assert set(PLACEHOLDER.findall(message.string)) == set(
                PLACEHOLDER.findall(message_id)
            ), (locale, message_id, message.string)


@pytest.mark.parametrize(
    ("tag", "chosen"),
    [
        ("de-DE", "de"),
        ("de", "de"),
        ("pt-BR", "pt_BR"),
        ("pt", "pt_BR"),
        ("ja", "ja"),
        ("fr-CA", "fr"),
        ("es-419", "es"),
        ("en-GB", "en"),
        ("nl", "en"),
        (None, "en"),
        ("", "en"),
    ],
)
def test_a_stripe_locale_chooses_its_catalog(tag, chosen):
    assert i18n.choose(tag) == chosen


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        ("de-CH,de;q=0.9,en;q=0.8", "de"),
        ("nl-NL, ja;q=0.7, fr;q=0.5", "ja"),  # no Dutch catalog: the next choice
        ("en-US,en;q=0.9,fr;q=0.8", "en"),
        ("fr;q=0, es", "es"),  # q=0: not acceptable
        ("pt-BR", "pt_BR"),
        ("*", "en"),
        ("", "en"),
        ("garbage;q=x, de", "de"),
    ],
)
def test_a_browsers_accept_language_chooses_the_pages_catalog(header, chosen):
    assert i18n.from_accept_language(header) == chosen


SETTINGS = load_settings({})
ENGLISH_WORDS = sorted((m for m in template_messages() if len(m) > 12), key=len, reverse=True)


@pytest.mark.parametrize("locale", ["de-DE", "fr-FR", "es-ES", "pt-BR", "ja-JP"])
@pytest.mark.parametrize("name", emails.NAMES)
def test_each_email_reads_in_the_customers_language(name, locale):
    facts = replace(emails.sample_facts(name, locale, "eur"), locale=locale)
    rendered = emails.render(name, facts, SETTINGS)
    words = PLACEHOLDER.sub("", "\n".join((rendered.subject, rendered.text, rendered.html)))
    for english in ENGLISH_WORDS:
        # A sentence left in English shows as its longest run without a placeholder.
        longest = max(PLACEHOLDER.split(english), key=len).strip()
        if len(longest) > 12:
            assert longest not in words, (name, locale, english)
    assert f'lang="{i18n.choose(locale).split("_")[0]}"' in rendered.html
    # Amounts and dates follow the locale too (CLDR).
    if locale.startswith("de") and name != "card_expiring":
        assert "29,00\xa0€" in rendered.text


@pytest.mark.parametrize("locale", ["en-US", "de-DE", "fr-FR", "es-ES", "pt-BR", "ja-JP"])
def test_the_brand_reads_right_in_every_subject(locale):
    for brand in ("Our service", "Acme Cloud"):
        settings = load_settings({"BRAND_NAME": brand})
        for name in emails.NAMES:
            facts = replace(emails.sample_facts(name, locale, "usd"), locale=locale)
            subject = emails.render(name, facts, settings).subject
            # The brand names the sender, first; never "Your Our service payment".
            # French sets a space before its colon.
            named = re.escape(brand)
            assert re.match(rf"{named} ?: \S|{named}：\S", subject), subject
            assert subject.count(brand) == 1, subject


def test_an_email_in_english_reads_its_own_words():
    rendered = emails.render("payment_failed", emails.sample_facts("payment_failed"), SETTINGS)
    assert rendered.subject == "Our service: your payment did not go through"
    assert "We tried to collect $29.00 from your Visa ending in 4242" in rendered.text
    assert 'lang="en"' in rendered.html


@pytest.mark.parametrize(
    ("locale", "values", "says"),
    [
        ("de", {"amount_due": 2900, "currency": "eur"}, "29,00\xa0€"),
        ("en", {"amount_due": 2900, "currency": "usd"}, "$29.00"),
        # A link with no amount on record names it in words, in the page's language.
        ("de", {}, "den fälligen Betrag"),
        ("en", {"amount_due": None, "currency": None}, "the amount due"),
    ],
)
def test_the_choice_page_writes_the_amount_in_its_locale(locale, values, says):
    from recovery.web import render_page

    page = render_page("choose", load_settings({}), locale, **values).decode()
    assert says in page
