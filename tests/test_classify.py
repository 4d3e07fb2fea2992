"""Every rule of the decline table, and the newer signals that override it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recovery.engine.classify import DECLINE_CODES, Category, Failure, classify, table

EXPECTED = {
    Category.FUNDS: ["insufficient_funds"],
    Category.RETRY: [
        "processing_error",
        "issuer_not_available",
        "try_again_later",
        "reenter_transaction",
        "card_velocity_exceeded",
        "withdrawal_count_limit_exceeded",
        "approve_with_id",
        "no_action_taken",
    ],
    Category.RETRY_CAPPED: ["do_not_honor", "generic_decline"],
    Category.CUSTOMER_ACTION: [
        "expired_card",
        "incorrect_cvc",
        "invalid_cvc",
        "invalid_expiry_month",
        "invalid_expiry_year",
        "incorrect_zip",
        "card_not_supported",
        "currency_not_supported",
        "restricted_card",
        "security_violation",
        "service_not_allowed",
        "not_permitted",
        "call_issuer",
        "do_not_try_again",
        "new_account_information_available",
        "testmode_decline",
    ],
    Category.AUTHENTICATE: ["authentication_required"],
    Category.DEAD_CARD: [
        "lost_card",
        "stolen_card",
        "pickup_card",
        "stop_payment_order",
        "revocation_of_authorization",
        "revocation_of_all_authorizations",
        "transaction_not_allowed",
        "incorrect_number",
        "invalid_number",
        "invalid_account",
    ],
    Category.DO_NOT_CONTACT: ["fraudulent", "merchant_blacklist", "highest_risk_level"],
    Category.CHECK_PAID: ["duplicate_transaction"],
    Category.OUR_BUG: ["invalid_amount"],
}
CASES = [(code, category) for category, codes in EXPECTED.items() for code in codes]


@pytest.mark.parametrize(("code", "category"), CASES)
def test_each_decline_code_has_its_category(code, category):
    assert classify(Failure(decline_code=code)).category is category


def test_the_table_covers_exactly_the_codes_tested():
    assert {code for code, _ in CASES} <= set(DECLINE_CODES)


@pytest.mark.parametrize("code", ["card_velocity_exceeded", "withdrawal_count_limit_exceeded"])
def test_velocity_limits_wait_a_day(code):
    assert classify(Failure(decline_code=code)).min_wait >= timedelta(hours=24)


def test_failure_code_is_used_when_there_is_no_decline_code():
    assert classify(Failure(failure_code="expired_card")).category is Category.CUSTOMER_ACTION


def test_unknown_code_falls_to_the_safe_default_and_is_logged(caplog):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        result = classify(Failure(decline_code="brand_new_code_2027"))
    assert result.category is Category.RETRY_CAPPED
    assert any(entry["event"] == "unknown_decline_code" for entry in logs)


def test_invoice_needing_action_means_authenticate():
    failure = Failure(decline_code="generic_decline", needs_authentication=True)
    assert classify(failure).category is Category.AUTHENTICATE


@pytest.mark.parametrize(
    ("advice", "base", "category"),
    [
        ("do_not_try_again", "insufficient_funds", Category.DEAD_CARD),
        ("confirm_card_data", "generic_decline", Category.CUSTOMER_ACTION),
        ("try_again_later", "call_issuer", Category.RETRY),
        # "Later" about missing money means payday: the cause's own plan stays.
        ("try_again_later", "insufficient_funds", Category.FUNDS),
    ],
)
def test_advice_code_overrides_the_decline_code(advice, base, category):
    assert classify(Failure(decline_code=base, advice_code=advice)).category is category


@pytest.mark.parametrize(
    ("mac", "category", "wait"),
    [
        ("01", Category.CUSTOMER_ACTION, timedelta(0)),
        ("02", Category.RETRY, timedelta(0)),
        ("03", Category.DEAD_CARD, timedelta(0)),
        ("21", Category.DEAD_CARD, timedelta(0)),
        ("24", Category.RETRY, timedelta(hours=1)),
        ("25", Category.RETRY, timedelta(hours=24)),
        ("26", Category.RETRY, timedelta(days=2)),
        ("27", Category.RETRY, timedelta(days=4)),
        ("28", Category.RETRY, timedelta(days=6)),
        ("29", Category.RETRY, timedelta(days=8)),
        ("30", Category.RETRY, timedelta(days=10)),
    ],
)
def test_mastercard_merchant_advice_codes(mac, category, wait):
    result = classify(
        Failure(decline_code="do_not_honor", card_brand="mastercard", network_advice_code=mac)
    )
    assert result.category is category
    assert result.min_wait == wait


def test_mastercard_codes_do_not_apply_to_visa():
    failure = Failure(decline_code="do_not_honor", card_brand="visa", network_advice_code="03")
    assert classify(failure).category is Category.RETRY_CAPPED


@pytest.mark.parametrize(
    "code", ["04", "07", "12", "14", "15", "41", "43", "46", "57", "R0", "R1", "R3"]
)
def test_visa_category_1_stops(code):
    failure = Failure(
        decline_code="insufficient_funds", card_brand="visa", network_decline_code=code
    )
    result = classify(failure)
    assert result.category is Category.DEAD_CARD and result.stops_card


def test_visa_other_codes_do_not_stop():
    failure = Failure(
        decline_code="insufficient_funds", card_brand="visa", network_decline_code="51"
    )
    assert classify(failure).category is Category.FUNDS


@pytest.mark.parametrize("code", ["fraudulent", "lost_card"])
def test_newer_signals_never_soften_fraud_or_a_dead_card(code):
    failure = Failure(
        decline_code=code,
        advice_code="try_again_later",
        card_brand="mastercard",
        network_advice_code="02",
    )
    assert classify(failure).category is classify(Failure(decline_code=code)).category


def test_a_retry_signal_does_not_undo_authentication():
    failure = Failure(decline_code="authentication_required", advice_code="try_again_later")
    assert classify(failure).category is Category.AUTHENTICATE


def test_stop_signals_are_sticky_whatever_their_order():
    failure = Failure(
        decline_code="insufficient_funds",
        advice_code="do_not_try_again",
        card_brand="mastercard",
        network_advice_code="02",
    )
    assert classify(failure).category is Category.DEAD_CARD


def test_do_not_contact_means_no_retry_no_email_and_review():
    result = classify(Failure(decline_code="fraudulent"))
    assert not result.may_retry_card and not result.contacts_customer and result.needs_review


def test_operator_table_lists_every_rule():
    rows = table()
    codes = {(r["signal"], r["code"]) for r in rows}
    assert ("decline_code", "insufficient_funds") in codes
    assert ("mastercard network_advice_code", "24") in codes
    assert ("visa network_decline_code", "R3") in codes
    assert ("any other code", "*") in codes
