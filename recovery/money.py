"""Money for people: integer minor units and a currency, shown in a locale.

Stripe counts amounts in the currency's smallest unit, and its list of
zero-decimal currencies is its own (ISO 4217 gives ISK and UGX two decimals;
Stripe does not), so the exponent comes from Stripe's documentation, and
Babel, from CLDR, writes the number and symbol the way the locale expects.
"""

from __future__ import annotations

from decimal import Decimal

from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency

# https://docs.stripe.com/currencies#zero-decimal and #three-decimal
ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)
THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])
DEFAULT_LOCALE = "en_US"


def exponent(currency: str) -> int:
    code = currency.lower()
    return 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2


def major_units(amount: int, currency: str) -> Decimal:
    return Decimal(amount).scaleb(-exponent(currency))


def locale_or_default(tag: str | None) -> Locale:
    """A Babel locale from a Stripe/BCP 47 tag ('de', 'fr-CA', 'ja_JP'); en_US if unknown."""
    if tag:
        try:
            return Locale.parse(tag.replace("-", "_"))
        except (ValueError, UnknownLocaleError):
            pass
    return Locale.parse(DEFAULT_LOCALE)


def format_money(amount: int, currency: str, locale: str | Locale | None) -> str:
    """`amount` minor units of `currency` as the customer reads it: 2000 usd → $20.00."""
    where = locale if isinstance(locale, Locale) else locale_or_default(locale)
    return format_currency(major_units(amount, currency), currency.upper(), locale=where)


def format_totals(totals: dict[str, int], locale: str = "en_US") -> str:
    """Amounts per currency, each written for `locale`: "$1,234.00 + €56.00"
    (a dollar and a yen do not add up)."""
    if not totals:
        return "0"
    return " + ".join(format_money(amount, currency, locale) for currency, amount in totals.items())
