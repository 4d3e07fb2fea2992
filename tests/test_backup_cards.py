"""Another card saved on the customer, tried once the card on file has no try left."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recovery.config import get_settings

from .conftest import T0
from .factories import steps_of, the_case

WORKS = {"brand": "mastercard", "last4": "4444", "fingerprint": "fpbackup1", "exp_year": 2031}
EXPIRED = {"brand": "visa", "last4": "0005", "fingerprint": "fpexpired", "exp_year": 2024}
DECLINES = {
    "brand": "visa",
    "last4": "0341",
    "fingerprint": "fpdeclines",
    "exp_year": 2030,
    "behavior": {"mode": "decline", "decline_code": "insufficient_funds"},
}


@pytest.fixture
def backup_settings(monkeypatch):
    """Settings for one test, from the environment it sets."""

    def apply(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    yield apply
    get_settings.cache_clear()


def _charged_cards(stack, invoice_id: str) -> list[str]:
    """The cards our pay calls charged (the renewal's own attempt is not one)."""
    return [
        stack.sim.state.objects[charge_id]["payment_method_details"]["card"]["fingerprint"]
        for _invoice, charge_id, _key in stack.charges(invoice_id)
    ]


def test_an_expired_card_is_recovered_on_another_saved_card(stack):
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "expired_card"},
        card={"fingerprint": "fponfile"},
        # Stripe lists saved cards newest first: the expired one, the declining one, ...
        other_cards=[WORKS, DECLINES, EXPIRED],
    )
    stack.tick()
    backup = next(
        s for s in steps_of(the_case(scenario["invoice"]).id) if s.origin == "backup_card"
    )
    assert backup.due_at == T0 + timedelta(hours=1)
    assert backup.why.startswith("the card on file cannot be retried")
    stack.run_until(T0 + timedelta(hours=3))
    case = the_case(scenario["invoice"])
    assert case.status == "recovered" and case.recovery_path == "backup_card"
    # The expired card was never tried; the declining one was, then the working one.
    assert _charged_cards(stack, scenario["invoice"]) == ["fpdeclines", "fpbackup1"]
    # The case still describes its own card and its own decline.
    assert case.card_fingerprint == "fponfile" and case.decline_code == "expired_card"


def test_a_soft_decline_tries_another_card_only_after_the_plans_tries(stack):
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "processing_error"},
        card={"fingerprint": "fponfile"},
        other_cards=[WORKS],
    )
    stack.tick()
    case = the_case(scenario["invoice"])
    assert not any(s.origin == "backup_card" for s in steps_of(case.id))
    stack.run_until(T0 + timedelta(days=21), timedelta(hours=6))
    case = the_case(scenario["invoice"])
    assert case.status == "recovered" and case.recovery_path == "backup_card"
    cards = _charged_cards(stack, scenario["invoice"])
    # All eight of the plan's tries on the card on file come first.
    assert cards == ["fponfile"] * 8 + ["fpbackup1"]


@pytest.mark.parametrize(
    ("env", "others", "outcome"),
    [
        ({"BACKUP_CARDS": "off"}, [WORKS], None),
        ({"BACKUP_CARDS_EXCLUDE": "{customer}"}, [WORKS], None),
        ({}, [EXPIRED], "no_backup_card"),
        ({}, [], "no_backup_card"),
    ],
)
def test_no_other_card_is_charged_when_off_excluded_expired_or_absent(
    stack, backup_settings, env, others, outcome
):
    scenario = stack.failed(
        {"mode": "decline", "decline_code": "lost_card"},
        card={"fingerprint": "fponfile"},
        other_cards=others,
    )
    backup_settings(**{k: v.format(customer=scenario["customer"]) for k, v in env.items()})
    stack.run_until(T0 + timedelta(hours=3))
    case = the_case(scenario["invoice"])
    assert case.status == "open"
    backups = [s.outcome for s in steps_of(case.id) if s.origin == "backup_card"]
    assert backups == ([outcome] if outcome else [])
    assert _charged_cards(stack, scenario["invoice"]) == []
