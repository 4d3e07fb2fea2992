"""The notice a business embeds in its app, behind a URL its backend signs.

    sig = hex(HMAC-SHA256(NOTICE_SECRET, "<customer id>.<expires, Unix seconds>"))
    GET /embed/notice?customer=cus_…&expires=…&sig=…[&mode=banner|wall]

Any language computes it (docs/app.md has the recipe); `signed_url` is the
helper for a Python backend. A URL lives at most a day: the business signs a
fresh one each time it renders the page. Forged, expired or foreign
signatures, and customers with nothing being recovered, show nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import datetime, timedelta
from urllib.parse import urlencode

MAX_LIFETIME = timedelta(days=1)
MODES = ("banner", "wall")


def signature(secret: str, customer: str, expires: int) -> str:
    message = f"{customer}.{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_query(secret: str, customer: str, expires: int, mode: str = "banner") -> str:
    return urlencode(
        {
            "customer": customer,
            "expires": expires,
            "sig": signature(secret, customer, expires),
            "mode": mode,
        }
    )


def signed_url(
    base_url: str,
    secret: str,
    customer: str,
    ttl: timedelta = timedelta(minutes=15),
    mode: str = "banner",
    script: bool = False,
) -> str:
    """The notice's URL for one customer, valid for `ttl` (the iframe's, or
    with `script` the notice.js that places it)."""
    if mode not in MODES:
        raise ValueError(f"mode is one of {MODES}")
    expires = int(time.time() + ttl.total_seconds())
    path = "/embed/notice.js" if script else "/embed/notice"
    return f"{base_url.rstrip('/')}{path}?{signed_query(secret, customer, expires, mode)}"


def verified(secret: str, params: dict[str, str], now: datetime) -> str | None:
    """The customer a signed request is for, or None: no signature, a wrong
    one, expired, or valid for longer than a URL may be."""
    customer, expires, sig = (
        params.get("customer", ""),
        params.get("expires", ""),
        params.get("sig", ""),
    )
    if not customer or len(customer) > 255 or not expires.isdigit() or len(sig) != 64:
        return None
    moment = int(expires)
    if not now.timestamp() <= moment <= (now + MAX_LIFETIME).timestamp():
        return None
    if not hmac.compare_digest(signature(secret, customer, moment), sig):
        return None
    return customer
