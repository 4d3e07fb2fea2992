"""Why did the payment fail, and what may we do about it? Pure and table-driven.

The table below is the whole policy: Stripe's decline codes, then the newer
signals that override them (Stripe's `advice_code`, Mastercard's Merchant
Advice Codes, Visa's decline categories). `recovery classify --list` prints it
for operators. Sources: Stripe's "Decline codes" reference and "Card network
advice codes" docs; Visa's "Retry rules" (category 1 = issuer will never
approve); Mastercard's Merchant Advice Code programme.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

import structlog

log = structlog.get_logger("recovery.classify")


class Category(enum.StrEnum):
    FUNDS = "funds"  # not enough money now: try again when the customer is paid
    RETRY = "retry"  # soft decline: try again later
    RETRY_CAPPED = "retry_capped"  # opaque decline: try again, fewer times
    CUSTOMER_ACTION = "customer_action"  # no off-session retry until the card changes
    AUTHENTICATE = "authenticate"  # the customer must complete 3DS
    DEAD_CARD = "dead_card"  # never retry this card; ask for another
    DO_NOT_CONTACT = "do_not_contact"  # no retries, no email; an operator reviews
    CHECK_PAID = "check_paid"  # maybe a duplicate: check the invoice first
    OUR_BUG = "our_bug"  # the request was wrong: an operator looks


# What each category means, in words for a person reading a report or a
# table; the code stays beside them (filters, plans files and JSON use it).
CATEGORY_WORDS: dict[Category, str] = {
    Category.FUNDS: "not enough money",
    Category.RETRY: "soft decline",
    Category.RETRY_CAPPED: "opaque decline",
    Category.CUSTOMER_ACTION: "the customer must change the card",
    Category.AUTHENTICATE: "the customer must authenticate",
    Category.DEAD_CARD: "card lost, stolen or closed",
    Category.DO_NOT_CONTACT: "not to be contacted",
    Category.CHECK_PAID: "maybe paid already",
    Category.OUR_BUG: "our request was wrong",
}


def described(code: str | None) -> str:
    """A category as a person reads it: its words, then its code."""
    try:
        return f"{CATEGORY_WORDS[Category(code or '')]} ({code})"
    except ValueError:
        return code or "unknown"


@dataclass(frozen=True)
class Rule:
    category: Category
    why: str
    min_wait: timedelta = timedelta(0)  # before the next attempt on this card


H, DAY = timedelta(hours=1), timedelta(days=1)

DECLINE_CODES: dict[str, Rule] = {
    # Soft: the issuer may approve later.
    "insufficient_funds": Rule(Category.FUNDS, "not enough money now; retry on paydays"),
    "processing_error": Rule(Category.RETRY, "a processing error at the issuer"),
    "issuer_not_available": Rule(Category.RETRY, "the issuer could not be reached"),
    "try_again_later": Rule(Category.RETRY, "the issuer asks to try later"),
    "reenter_transaction": Rule(Category.RETRY, "the issuer asks to resubmit"),
    "card_velocity_exceeded": Rule(Category.RETRY, "card over its velocity limit", DAY),
    "withdrawal_count_limit_exceeded": Rule(Category.RETRY, "card over its count limit", DAY),
    "approve_with_id": Rule(Category.RETRY, "issuer could not authorise; retry"),
    "no_action_taken": Rule(Category.RETRY, "no reason given; retry"),
    "do_not_honor": Rule(Category.RETRY_CAPPED, "opaque decline; retried fewer times"),
    "generic_decline": Rule(Category.RETRY_CAPPED, "opaque decline; retried fewer times"),
    "card_declined": Rule(Category.RETRY_CAPPED, "opaque decline; retried fewer times"),
    # The customer must act: retrying the same card cannot succeed.
    "expired_card": Rule(Category.CUSTOMER_ACTION, "the card has expired"),
    "incorrect_cvc": Rule(Category.CUSTOMER_ACTION, "the CVC is wrong"),
    "invalid_cvc": Rule(Category.CUSTOMER_ACTION, "the CVC is wrong"),
    "invalid_expiry_month": Rule(Category.CUSTOMER_ACTION, "the expiry month is wrong"),
    "invalid_expiry_year": Rule(Category.CUSTOMER_ACTION, "the expiry year is wrong"),
    "incorrect_zip": Rule(Category.CUSTOMER_ACTION, "the postal code is wrong"),
    "card_not_supported": Rule(Category.CUSTOMER_ACTION, "the card does not support this"),
    "currency_not_supported": Rule(Category.CUSTOMER_ACTION, "the card cannot pay this currency"),
    "restricted_card": Rule(Category.CUSTOMER_ACTION, "the card is restricted"),
    "security_violation": Rule(Category.CUSTOMER_ACTION, "the issuer flagged a security issue"),
    "service_not_allowed": Rule(Category.CUSTOMER_ACTION, "the card does not allow this"),
    "not_permitted": Rule(Category.CUSTOMER_ACTION, "the payment is not permitted"),
    "call_issuer": Rule(Category.CUSTOMER_ACTION, "the customer must call their bank"),
    "do_not_try_again": Rule(Category.CUSTOMER_ACTION, "the issuer says do not try again"),
    "new_account_information_available": Rule(
        Category.CUSTOMER_ACTION, "the card has new details; ask for them"
    ),
    # Strong customer authentication.
    "authentication_required": Rule(Category.AUTHENTICATE, "the bank asks the customer to confirm"),
    # The card is dead; the real cardholder usually has a replacement.
    "lost_card": Rule(Category.DEAD_CARD, "reported lost"),
    "stolen_card": Rule(Category.DEAD_CARD, "reported stolen"),
    "pickup_card": Rule(Category.DEAD_CARD, "the issuer asks to retain the card"),
    "stop_payment_order": Rule(Category.DEAD_CARD, "the cardholder stopped payments"),
    "revocation_of_authorization": Rule(Category.DEAD_CARD, "authorisation revoked"),
    "revocation_of_all_authorizations": Rule(Category.DEAD_CARD, "all authorisations revoked"),
    "transaction_not_allowed": Rule(Category.DEAD_CARD, "the card refuses this payment"),
    "incorrect_number": Rule(Category.DEAD_CARD, "the card number is wrong"),
    "invalid_number": Rule(Category.DEAD_CARD, "the card number is wrong"),
    "invalid_account": Rule(Category.DEAD_CARD, "the account is invalid"),
    # Suspected fraud: never retry, never email.
    "fraudulent": Rule(Category.DO_NOT_CONTACT, "suspected fraud"),
    "merchant_blacklist": Rule(Category.DO_NOT_CONTACT, "on the merchant's block list"),
    "highest_risk_level": Rule(Category.DO_NOT_CONTACT, "Radar's highest risk level"),
    # Special.
    "duplicate_transaction": Rule(Category.CHECK_PAID, "maybe paid already; check first", H),
    "invalid_amount": Rule(Category.OUR_BUG, "the amount was refused: our request is wrong"),
    "testmode_decline": Rule(Category.CUSTOMER_ACTION, "a Stripe test card that always declines"),
}

# What an unknown code becomes: retried, but sparingly, and the customer told.
UNKNOWN = Rule(Category.RETRY_CAPPED, "unknown decline code; retried sparingly")

# Stripe's advice_code, newer than the decline code and preferred over it.
ADVICE_CODES: dict[str, Rule] = {
    "do_not_try_again": Rule(Category.DEAD_CARD, "advice: do not try this card again"),
    "confirm_card_data": Rule(Category.CUSTOMER_ACTION, "advice: the customer must confirm"),
    "try_again_later": Rule(Category.RETRY, "advice: try again later"),
}

# Mastercard Merchant Advice Codes (outcome.network_advice_code).
MASTERCARD_ADVICE: dict[str, Rule] = {
    "01": Rule(Category.CUSTOMER_ACTION, "Mastercard 01: new account information available"),
    "02": Rule(Category.RETRY, "Mastercard 02: cannot approve now, try later"),
    "03": Rule(Category.DEAD_CARD, "Mastercard 03: do not try again"),
    "21": Rule(Category.DEAD_CARD, "Mastercard 21: payment cancelled by the cardholder"),
    "24": Rule(Category.RETRY, "Mastercard 24: retry after 1 hour", H),
    "25": Rule(Category.RETRY, "Mastercard 25: retry after 24 hours", DAY),
    "26": Rule(Category.RETRY, "Mastercard 26: retry after 2 days", 2 * DAY),
    "27": Rule(Category.RETRY, "Mastercard 27: retry after 4 days", 4 * DAY),
    "28": Rule(Category.RETRY, "Mastercard 28: retry after 6 days", 6 * DAY),
    "29": Rule(Category.RETRY, "Mastercard 29: retry after 8 days", 8 * DAY),
    "30": Rule(Category.RETRY, "Mastercard 30: retry after 10 days", 10 * DAY),
}

# Visa decline category 1: the issuer will never approve this card.
VISA_CATEGORY_1 = frozenset(
    {"04", "07", "12", "14", "15", "41", "43", "46", "57", "R0", "R1", "R3"}
)
VISA_STOP = Rule(Category.DEAD_CARD, "Visa category 1: the issuer will never approve")

# Categories a newer signal may not soften: fraud stays fraud, a dead card dead.
_FINAL = frozenset({Category.DO_NOT_CONTACT, Category.OUR_BUG})
_STOPPED = frozenset({Category.DEAD_CARD})


@dataclass(frozen=True)
class Failure:
    """One failed payment's codes, as recorded on the case."""

    decline_code: str | None = None
    failure_code: str | None = None
    advice_code: str | None = None
    network_advice_code: str | None = None
    network_decline_code: str | None = None
    card_brand: str | None = None
    needs_authentication: bool = False


@dataclass(frozen=True)
class Classification:
    category: Category
    why: str
    min_wait: timedelta
    # Which rule decided, for the timeline and the operator table.
    source: str

    @property
    def may_retry_card(self) -> bool:
        """Whether an off-session retry on the same card can succeed."""
        return self.category in (
            Category.FUNDS,
            Category.RETRY,
            Category.RETRY_CAPPED,
            Category.CHECK_PAID,
        )

    @property
    def stops_card(self) -> bool:
        """Whether the card networks forbid any further attempt on this card."""
        return self.category is Category.DEAD_CARD

    @property
    def contacts_customer(self) -> bool:
        return self.category not in (Category.DO_NOT_CONTACT, Category.OUR_BUG)

    @property
    def needs_review(self) -> bool:
        return self.category in (Category.DO_NOT_CONTACT, Category.OUR_BUG)


def _base(failure: Failure) -> tuple[Rule, str]:
    if failure.needs_authentication:
        return DECLINE_CODES["authentication_required"], "invoice needs action"
    for field_name in ("decline_code", "failure_code"):
        code = getattr(failure, field_name)
        if code and code in DECLINE_CODES:
            return DECLINE_CODES[code], f"{field_name}={code}"
    if failure.decline_code or failure.failure_code:
        log.warning(
            "unknown_decline_code",
            decline_code=failure.decline_code,
            failure_code=failure.failure_code,
        )
    return UNKNOWN, f"unknown={failure.decline_code or failure.failure_code}"


def classify(failure: Failure) -> Classification:
    """The category and instruction for a failure; newer signals override the code."""
    rule, source = _base(failure)
    wait = rule.min_wait
    brand = (failure.card_brand or "").lower()
    overrides: list[tuple[Rule, str]] = []
    if failure.advice_code in ADVICE_CODES:
        overrides.append((ADVICE_CODES[failure.advice_code], f"advice_code={failure.advice_code}"))
    if brand == "mastercard" and failure.network_advice_code in MASTERCARD_ADVICE:
        code = failure.network_advice_code
        overrides.append((MASTERCARD_ADVICE[code], f"mastercard_advice={code}"))
    if brand == "visa" and failure.network_decline_code in VISA_CATEGORY_1:
        overrides.append((VISA_STOP, f"visa_category_1={failure.network_decline_code}"))
    for override, override_source in overrides:
        wait = max(wait, override.min_wait)
        if rule.category in _FINAL or rule.category in _STOPPED:
            continue
        if rule.category is Category.AUTHENTICATE and override.category is Category.RETRY:
            continue  # a retry cannot authenticate; only the customer can
        if rule.category is Category.FUNDS and override.category is Category.RETRY:
            continue  # "try later" about missing funds: later means payday
        rule, source = override, override_source
    return Classification(rule.category, rule.why, wait, source)


def table() -> list[dict[str, str]]:
    """Every rule, for `recovery classify --list`."""
    rows = []
    for group, rules in (
        ("decline_code", DECLINE_CODES),
        ("advice_code", ADVICE_CODES),
        ("mastercard network_advice_code", MASTERCARD_ADVICE),
    ):
        for code, rule in rules.items():
            rows.append(_row(group, code, rule))
    for code in sorted(VISA_CATEGORY_1):
        rows.append(_row("visa network_decline_code", code, VISA_STOP))
    rows.append(_row("any other code", "*", UNKNOWN))
    return rows


def _row(group: str, code: str, rule: Rule) -> dict[str, str]:
    wait = rule.min_wait
    waits = f"{wait.days}d" if wait.days else (f"{wait.seconds // 3600}h" if wait else "")
    return {
        "signal": group,
        "code": code,
        "category": rule.category.value,
        "min_wait": waits,
        "why": rule.why,
    }
