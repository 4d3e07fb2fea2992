"""A customer's time zone from their invoice's billing address."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from recovery.customers import zones


@pytest.mark.parametrize(
    ("country", "region", "zone"),
    [
        ("DE", None, "Europe/Berlin"),  # two zones in the tz database; Berlin by people
        ("fr", None, "Europe/Paris"),  # one zone; any case
        (" JP ", None, "Asia/Tokyo"),
        ("US", "CA", "America/Los_Angeles"),
        ("US", "ny", "America/New_York"),
        ("US", "AZ", "America/Phoenix"),
        ("US", None, "America/New_York"),  # no state: where most Americans are
        ("US", "Ontario", "America/New_York"),  # not a state's code
        ("BR", "SP", "America/Sao_Paulo"),
        ("XX", None, None),  # no such country
        ("AQ", None, None),  # many zones, none most populous: unknown
        ("", None, None),
        (None, "CA", None),
        (49, None, None),  # not what Stripe sends: unknown, not an error
        ("US", ["CA"], "America/New_York"),
    ],
)
def test_a_zone_from_an_address(country, region, zone):
    assert zones.zone_for(country, region) == zone


def test_every_zone_named_exists():
    named = set(zones.US_STATES.values()) | set(zones.MOST_POPULOUS.values())
    for name in named:
        ZoneInfo(name)
    assert len(zones.US_STATES) == 52  # fifty states, DC and Puerto Rico


def test_an_address_as_stripe_writes_it():
    assert zones.zone_of_address({"country": "US", "state": "WA", "city": None}) == (
        "America/Los_Angeles"
    )
    assert zones.zone_of_address({"country": None, "state": None}) is None
    assert zones.zone_of_address(None) is None


def test_a_zone_this_machine_lacks_is_unknown_rather_than_an_error(monkeypatch):
    # A slim image without the tz database: the engine plans in UTC instead.
    monkeypatch.setitem(zones.MOST_POPULOUS, "ZZ", "Mars/Olympus_Mons")
    assert zones.zone_for("ZZ") is None
