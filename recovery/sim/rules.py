"""The card networks' retry rules, checked on the Stripe-compatible server's
own record of every charge: the truth of what was attempted, not the
engine's ledger of what it believes it attempted.

* Visa: a declined card may be reattempted at most VISA_MAX_ATTEMPTS_30D
  times in 30 days (15 by default; Visa allows 20 for categories 2-4 since
  April 2026).
* Never again after a decline that says so: lost, stolen, picked up or
  fraudulent cards, and any decline whose advice is `do_not_try_again`
  (Visa category 1, Mastercard merchant advice codes 03 and 21).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta

NEVER_AGAIN_DECLINES = frozenset({"lost_card", "stolen_card", "pickup_card", "fraudulent"})
NEVER_AGAIN_ADVICE = frozenset({"do_not_try_again"})
_WINDOW = int(timedelta(days=30).total_seconds())


def violations(charges: Iterable[dict], visa_cap: int) -> dict[str, int]:
    """Attempts that broke a rule, by rule, over Stripe charge objects."""
    by_card: dict[str, list[dict]] = defaultdict(list)
    for charge in charges:
        card = (charge.get("payment_method_details") or {}).get("card") or {}
        by_card[card.get("fingerprint") or charge.get("payment_method") or ""].append(charge)
    found = {"visa_over_cap": 0, "after_never_again": 0}
    for attempts in by_card.values():
        attempts.sort(key=lambda c: (c["created"], c["id"]))
        told_never = False
        for index, charge in enumerate(attempts):
            if told_never:
                found["after_never_again"] += 1
            brand = charge["payment_method_details"]["card"].get("brand")
            if brand == "visa":
                # Reattempts: the attempts in the 30 days before this one,
                # not counting the first.
                recent = [a for a in attempts[:index] if charge["created"] - a["created"] < _WINDOW]
                if len(recent) > visa_cap:
                    found["visa_over_cap"] += 1
            outcome = charge.get("outcome") or {}
            if not charge.get("paid") and (
                outcome.get("reason") in NEVER_AGAIN_DECLINES
                or outcome.get("advice_code") in NEVER_AGAIN_ADVICE
            ):
                told_never = True
    return found
