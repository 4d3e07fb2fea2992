"""A customer's time zone, from the billing address on their invoice.

Stripe keeps no time zone for a customer, but a finalized invoice carries
the customer's address (`customer_address`: country, state). Retries go at
the customer's local morning and emails write dates in their calendar, so
the zone is read from that address once the renewal fails:

* a country with one zone (the tz database's, through Babel's CLDR data):
  that zone;
* the United States: the state's zone (where a state spans two, the one
  most of its people live in);
* another country spanning zones: its most populous zone, for the
  countries below; any other, and no address at all, stay unknown (UTC).

A wrong guess costs little: the plans' tries fall on the right days
whatever the hour, and the card networks' limits do not depend on it.
"""

from __future__ import annotations

from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.core import get_global

# Where a state spans two zones, the one most of its people live in.
_STATES_BY_ZONE = {
    "America/New_York": "CT DC DE FL GA KY MA MD ME NC NH NJ NY OH PA RI SC VA VT WV",
    "America/Chicago": "AL AR IA IL KS LA MN MO MS ND NE OK SD TN TX WI",
    "America/Denver": "CO MT NM UT WY",
    "America/Los_Angeles": "CA NV OR WA",
    "America/Anchorage": "AK",
    "America/Phoenix": "AZ",  # no daylight saving time
    "Pacific/Honolulu": "HI",
    "America/Boise": "ID",
    "America/Indiana/Indianapolis": "IN",
    "America/Detroit": "MI",
    "America/Puerto_Rico": "PR",
}
US_STATES = {state: zone for zone, states in _STATES_BY_ZONE.items() for state in states.split()}

# Countries spanning zones: the zone most of their people live in.
MOST_POPULOUS = {
    "US": "America/New_York",
    "CA": "America/Toronto",
    "MX": "America/Mexico_City",
    "BR": "America/Sao_Paulo",
    "AR": "America/Argentina/Buenos_Aires",
    "CL": "America/Santiago",
    "EC": "America/Guayaquil",
    "AU": "Australia/Sydney",
    "NZ": "Pacific/Auckland",
    "RU": "Europe/Moscow",
    "UA": "Europe/Kyiv",
    "KZ": "Asia/Almaty",
    "CN": "Asia/Shanghai",
    "ID": "Asia/Jakarta",
    "MY": "Asia/Kuala_Lumpur",
    "ES": "Europe/Madrid",
    "PT": "Europe/Lisbon",
    "DE": "Europe/Berlin",
    "CD": "Africa/Kinshasa",
}


def zone_for(country: Any, region: Any = None) -> str | None:
    """The IANA zone for an address's country (ISO 3166 alpha-2) and region
    (a US state's two letters); None when it cannot be told, whatever the
    payload holds."""
    if not isinstance(country, str) or not country.strip():
        return None
    country = country.strip().upper()
    found = None
    if country == "US" and isinstance(region, str):
        found = US_STATES.get(region.strip().upper())
    if found is None:
        found = MOST_POPULOUS.get(country)
    if found is None:
        zones = _territory_zones().get(country, [])
        found = zones[0] if len(zones) == 1 else None
    return found if found and _known(found) else None


def zone_of_address(address: Any) -> str | None:
    """zone_for an address object as Stripe writes one (or None)."""
    if not isinstance(address, dict):
        return None
    return zone_for(address.get("country"), address.get("state"))


@cache
def _territory_zones() -> dict[str, list[str]]:
    return dict(get_global("territory_zones"))


@cache
def _known(name: str) -> bool:
    """Whether this machine's tz database has the zone (a slim image may not)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True
