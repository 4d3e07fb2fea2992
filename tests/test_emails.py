"""Every email in three locales and currencies, both parts; copy that fits the cause."""

from __future__ import annotations

import dataclasses
import re

import pytest
from freezegun import freeze_time

from recovery.config import load_settings
from recovery.customers import emails
from recovery.money import format_money

SETTINGS = load_settings({"BRAND_NAME": "Acme", "BRAND_SUPPORT_EMAIL": "help@acme.test"})
LOCALES = [
    ("en_US", "usd", "$29.00"),
    ("de_DE", "eur", "29,00\xa0€"),
    ("ja_JP", "jpy", "￥1,500"),
]


@pytest.mark.parametrize("name", emails.NAMES)
@pytest.mark.parametrize(("locale", "currency", "amount"), LOCALES)
def test_every_email_renders_both_parts_in_the_customers_terms(name, locale, currency, amount):
    rendered = emails.render(name, emails.sample_facts(name, locale, currency), SETTINGS)
    assert rendered.subject and "\n" not in rendered.subject and "Acme" in rendered.subject
    for part in (rendered.text, rendered.html):
        assert "{{" not in part and "{%" not in part
        assert "help@acme.test" in part
    html_amount = amount.replace("\xa0", "&nbsp;")
    if name != "card_expiring":
        assert amount in rendered.text and html_amount in rendered.html
    # Mail clients drop <style>: every rule is inlined.
    assert "<style" not in rendered.html and 'style="' in rendered.html
    assert f'lang="{locale[:2]}"' in rendered.html
    link = "https://billing.example.com/r/sample-link-token"
    opt_out = "https://billing.example.com/u/sample-opt-out-token"
    if name == "recovered":
        assert link not in rendered.text and opt_out not in rendered.text
    else:
        assert link in rendered.text and f'href="{link}"' in rendered.html
        assert opt_out in rendered.text and f'href="{opt_out}"' in rendered.html


def test_dates_follow_the_customers_locale_and_time_zone():
    facts = emails.sample_facts("payment_failed", "de_DE", "eur")
    from datetime import UTC, datetime

    # 23:30 UTC on 31 December is already 1 January in Paris.
    facts = dataclasses.replace(facts, next_retry_at=datetime(2026, 12, 31, 23, 30, tzinfo=UTC))
    text = emails.render("payment_failed", facts, SETTINGS).text
    assert "1. Januar 2027" in text
    utc = dataclasses.replace(facts, timezone=None)
    assert "31. Dezember 2026" in emails.render("payment_failed", utc, SETTINGS).text


def cause(name: str, category: str, decline_code: str) -> str:
    facts = dataclasses.replace(
        emails.sample_facts(name), category=category, decline_code=decline_code
    )
    return emails.render(name, facts, SETTINGS).text.lower()


def test_a_soft_decline_is_not_told_the_card_is_broken():
    text = cause("payment_failed", "retry", "insufficient_funds")
    assert "your bank declined the payment" in text
    for wrong in ("expired", "no longer be charged", "insufficient", "funds", "will not help"):
        assert wrong not in text
    assert "we will try again on" in text


def test_a_dead_card_is_asked_for_another_without_naming_why():
    text = cause("card_update_needed", "dead_card", "stolen_card")
    assert "can no longer be charged" in text
    for never in ("stolen", "lost", "fraud", "pickup"):
        assert never not in text


def test_customer_action_names_what_to_fix():
    assert "has expired" in cause("card_update_needed", "customer_action", "expired_card")
    assert "security code" in cause("card_update_needed", "customer_action", "incorrect_cvc")


def test_authentication_asks_to_confirm_not_to_change_the_card():
    text = cause("authentication_required", "authenticate", "authentication_required")
    assert "confirm the payment" in text and "update your card" not in text


def test_html_escapes_what_comes_from_stripe():
    facts = dataclasses.replace(
        emails.sample_facts("payment_failed"), customer_name="<script>alert(1)</script> Bob"
    )
    html = emails.render("payment_failed", facts, SETTINGS).html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_unknown_email_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no email called 'nope'"):
        emails.render("nope", emails.sample_facts("payment_failed"), SETTINGS)


@pytest.mark.parametrize(
    ("amount", "currency", "locale", "shown"),
    [
        (2000, "usd", "en_US", "$20.00"),
        (1500, "jpy", "ja_JP", "￥1,500"),
        (1500, "jpy", "en_US", "¥1,500"),
        (1999, "eur", "fr-FR", "19,99\xa0€"),
        (123450, "kwd", "en_US", "KWD123.450"),
        (19000, "krw", "ko_KR", "₩19,000"),
        (2000, "usd", "not-a-locale", "$20.00"),
    ],
)
def test_money_in_minor_units_for_the_locale(amount, currency, locale, shown):
    assert format_money(amount, currency, locale) == shown


def test_text_part_has_no_runs_of_blank_lines():
    for name in emails.NAMES:
        text = emails.render(name, emails.sample_facts(name), SETTINGS).text
        assert not re.search(r"\n\s*\n\s*\n", text), name


@freeze_time("2026-12-31 18:00:00")
def test_a_preview_on_new_years_eve_retries_in_january_of_the_next_year():
    facts = emails.sample_facts("payment_failed")
    rendered = emails.render("payment_failed", facts, SETTINGS)
    assert (facts.next_retry_at.year, facts.next_retry_at.month) == (2027, 1)
    assert "January 1, 2027" in rendered.text
    assert (facts.card_exp_month, facts.card_exp_year) == (12, 2026)
