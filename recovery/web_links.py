"""The customer's side of the web app: recovery links and reminder opt-out.

    GET  /r/<token>     → 303 to a Stripe page, or a page of ours
    GET  /r/card-saved  ← Stripe Checkout returns here; /r/not-saved on cancel
    GET  /u/<token>     → "stop reminders?" (mail scanners fetch links: GET changes nothing)
    POST /u/<token>     → stopped (also RFC 8058 one-click from the mail client)

Every answer is uncacheable, unindexed and sends no Referer, so a token never
leaks from the address bar to another site or a proxy cache.
"""

from __future__ import annotations

import asyncio
import re
import threading
from functools import lru_cache

from jinja2 import Environment, FileSystemLoader, select_autoescape

from recovery import clock, redeem
from recovery.config import Settings
from recovery.emails import TEMPLATES_DIR
from recovery.ratelimit import LocalBucket

_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-robots-tag", b"noindex, nofollow"),
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src https:; "
        b"form-action 'self'; frame-ancestors 'none'",
    ),
]
_TITLES = {
    "link_invalid": "This link has expired",
    "all_set": "You are all set",
    "card_saved": "Thank you, your card is saved",
    "card_not_saved": "Your card was not changed",
    "opt_out": "Reminders stopped",
    "opt_out_confirm": "Stop payment reminders?",
    "too_many": "Please wait a moment",
    "unavailable": "Please try again shortly",
}


@lru_cache(maxsize=1)
def _pages() -> Environment:
    return Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR / "pages")),
        autoescape=select_autoescape(default=True),
    )


def render_page(name: str, settings: Settings, **values) -> bytes:
    brand = {
        "name": settings.brand_name,
        "support_email": settings.brand_support_email,
        "accent": settings.brand_accent_color,
    }
    page = _pages().get_template(f"{name}.html")
    return page.render(title=_TITLES[name], brand=brand, **values).encode()


class ClientLimiter:
    """Clicks per minute per client address, in this process: enough to make
    guessing tokens pointless (2^256 of them) and to stop a client hammering
    Stripe session creation through us."""

    def __init__(self, per_minute: int, max_clients: int = 50_000):
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._buckets: dict[str, LocalBucket] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        with self._lock:
            if len(self._buckets) >= self.max_clients:
                self._buckets.clear()  # a flood of addresses: forget, rather than grow
            bucket = self._buckets.get(client)
            if bucket is None:
                # A minute's clicks may come at once, then they refill over the minute.
                bucket = LocalBucket(self.per_minute / 60.0, burst=float(self.per_minute))
                self._buckets[client] = bucket
        return bucket.try_take() == 0


async def _send(send, status: int, body: bytes = b"", location: str | None = None) -> None:
    headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
    if location:
        headers.append((b"location", location.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def make_links_app(settings: Settings):
    limiter = ClientLimiter(settings.link_clicks_per_minute)

    async def handle(scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        client = (scope.get("client") or ("unknown", 0))[0]
        if path in ("/r/card-saved", "/r/not-saved") and method in ("GET", "HEAD"):
            name = "card_saved" if path == "/r/card-saved" else "card_not_saved"
            return await _send(send, 200, render_page(name, settings))
        kind, _, token = path[1:].partition("/")
        if not _TOKEN.fullmatch(token):
            return await _send(send, 404, render_page("link_invalid", settings))
        if not limiter.allow(client):
            return await _send(send, 429, render_page("too_many", settings))
        now = clock.now()
        if kind == "r" and method in ("GET", "HEAD"):
            answer = await asyncio.to_thread(redeem.redeem, token, now, settings)
        elif kind == "u" and method == "POST":
            answer = await asyncio.to_thread(redeem.opt_out, token, now)
        elif kind == "u" and method in ("GET", "HEAD"):
            valid = await asyncio.to_thread(redeem.opt_out_valid, token, now)
            page = "opt_out_confirm" if valid else "link_invalid"
            return await _send(
                send, 200 if valid else 404, render_page(page, settings, action=path)
            )
        else:
            return await _send(send, 405, b"")
        if answer.location:
            return await _send(send, answer.status, location=answer.location)
        return await _send(send, answer.status, render_page(answer.page, settings))

    return handle
