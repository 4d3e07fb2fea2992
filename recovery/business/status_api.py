"""The status API the business's app calls:

    GET /api/v1/customers/<stripe customer id>/recovery
    Authorization: Bearer rcv_…

Whether a payment of the customer's is being recovered; if so how much is
due, what the customer must do (pay, a new card, authenticate) as a code and
in words safe to show, in the customer's language, the day service ends if
nothing is done, and, for a key with the `links` scope, a fresh link to do it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from recovery.business import announce, api_keys
from recovery.config import Settings
from recovery.customers import i18n, pages, standing
from recovery.db import session_scope

PATH = re.compile(r"/api/v1/customers/([A-Za-z0-9_]{1,255})/recovery")


def key_id_of(presented: str) -> str | None:
    """The id part of a presented key (to rate-limit by, before checking it)."""
    parts = presented.split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "rcv" and parts[1].isdigit() else None


def answer(presented: str, customer: str, now: datetime, settings: Settings) -> tuple[int, dict]:
    """The status and JSON body for one request."""
    with session_scope() as session:
        key = api_keys.authenticate(session, presented, now)
        if key is None:
            return 401, {"error": "invalid or revoked API key"}
        if "status" not in key.scopes:
            return 403, {"error": "this key's scopes do not include status"}
        found = standing.of_customer(session, customer)
        if found is None:
            return 200, {"open": False, "customer": customer}
        body: dict[str, Any] = {
            "open": True,
            "customer": customer,
            "open_cases": found.open_cases,
            "amount_due": found.amount_due,
            "currency": found.currency,
            "action": found.action,
            "service_ends_at": announce.iso(found.service_ends_at),
            "says": pages.standing_words(found, settings, i18n.choose(found.locale)),
        }
        if "links" in key.scopes:
            url, expires = standing.fresh_link(session, found, now, settings, "app")
            body["link"] = {"url": url, "expires_at": announce.iso(expires)}
    return 200, body
