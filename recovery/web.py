"""The one web app (ASGI): the Stripe webhook receiver, the customers' recovery
links and the health routes.

    POST /webhooks/stripe  → inbox/receiver.py: verify, store once, 2xx = committed
    GET  /r/<token>        → 303 to a Stripe page, or a page of ours (customers/links.py)
    GET  /r/card-saved     ← Stripe Checkout returns here; /r/not-saved on cancel
    GET  /u/<token>        → "stop reminders?" (mail scanners fetch links: GET changes nothing)
    POST /u/<token>        → stopped (also RFC 8058 one-click from the mail client)
    GET  /api/v1/customers/<id>/recovery → the customer's standing, for the business's app
    GET  /embed/notice[.js] → the notice the business embeds (signed URL), /go, /state
    POST /twilio/inbound, /twilio/status → customers' SMS replies, delivery reports
    GET  /healthz, /readyz
    GET  /metrics          → Prometheus (metrics.py), behind METRICS_TOKEN when set

Framework-free ASGI rather than WSGI: the receiver is the hot path during
billing runs. Measured on the 2-core bench machine, gunicorn's threaded WSGI
worker tops out near 2,300 requests/s on an app that does nothing, and the
gevent worker near 4,100; the uvicorn worker (httptools, uvloop) serves the
same nothing at 14,000/s, which leaves room for the HMAC, the JSON parse and
the database. Requests never block the event loop: the insert happens on the
group-commit thread and anything else that is synchronous runs in a worker
thread. Every customer page is uncacheable, unindexed and sends no Referer,
so a token never leaks from the address bar to another site or a proxy cache.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from html import escape
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from recovery import clock, metrics
from recovery.business import status_api
from recovery.config import Settings
from recovery.customers import i18n, links, notice, standing, texting
from recovery.customers.pages import PAGES as PAGES
from recovery.customers.pages import ends_on, render_help, render_page
from recovery.db import get_engine, session_scope
from recovery.inbox.receiver import (
    InboxWriter,
    Receive,
    Send,
    WebhookRejected,
    read_body,
    receive_webhook,
    respond,
)
from recovery.ratelimit import LocalBucket, RedisBucket

log = structlog.get_logger("recovery.web")

Scope = dict[str, Any]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
Headers = list[tuple[bytes, bytes]]


def page_headers(settings: Settings) -> Headers:
    """The customer pages' headers. Browsers hold the redirect that follows a
    form post to form-action too, so it names the Stripe pages the card link's
    choice leads to (and a Stripe-compatible server, where one is configured)."""
    targets = ["'self'", *(f"https://{host}" for host in sorted(links.STRIPE_HOSTS))]
    if settings.stripe_api_base:
        base = urlsplit(settings.stripe_api_base)
        targets.append(f"{base.scheme}://{base.netloc}")
    policy = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src https:; "
        f"form-action {' '.join(targets)}; frame-ancestors 'none'"
    )
    return [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-robots-tag", b"noindex, nofollow"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", policy.encode()),
    ]


class ClientLimiter:
    """Clicks per minute per client address: enough to make guessing tokens
    pointless (2^256 of them) and to stop a client hammering Stripe session
    creation through us. In Redis where the broker is Redis, so the limit
    holds across web processes; else in this process."""

    def __init__(
        self,
        per_minute: int,
        redis_url: str | None = None,
        max_clients: int = 50_000,
        kind: str = "clicks",
    ):
        self.per_minute = per_minute
        self.kind = kind
        self.max_clients = max_clients
        self._buckets: dict[str, LocalBucket] = {}
        self._lock = threading.Lock()
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=0.5) if redis_url else None

    def allow(self, client: str) -> bool:
        # A minute's clicks may come at once, then they refill over the minute.
        rate, burst = self.per_minute / 60.0, float(self.per_minute)
        if self._redis is not None:
            key = f"recovery:ratelimit:{self.kind}:{client}"
            try:
                return RedisBucket(self._redis, rate, key, burst).try_take() == 0
            except redis.RedisError as exc:
                # Customers' links keep working while Redis is away, limited
                # per process meanwhile.
                log.warning("click_limit_local", error=type(exc).__name__)
        with self._lock:
            if len(self._buckets) >= self.max_clients:
                self._buckets.clear()  # a flood of addresses: forget, rather than grow
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = LocalBucket(rate, burst=burst)
                self._buckets[client] = bucket
        return bucket.try_take() == 0


def client_address(scope: Scope, trusted: tuple[IPv4Network | IPv6Network, ...]) -> str:
    """The client's address: the peer's, or where the peer is a trusted proxy,
    the last address in X-Forwarded-For that is not a trusted proxy (each
    proxy appends the address it got the request from; anything to the left
    of the first untrusted one is the client's to forge)."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not trusted or not _within(peer, trusted):
        return peer
    forwarded = [
        value.decode("latin-1")
        for name, value in scope.get("headers") or ()
        if name.lower() == b"x-forwarded-for"
    ]
    hops = [h.strip() for h in ",".join(forwarded).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _within(address: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


async def _page(
    send: Send, status: int, body: bytes = b"", location: str | None = None, *, base: Headers
) -> None:
    headers = [*base, (b"content-length", str(len(body)).encode())]
    if location:
        headers.append((b"location", location.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def make_links_app(settings: Settings) -> Any:
    """The customer's side: recovery links and reminder opt-out."""
    shared = settings.broker_url.startswith(("redis://", "rediss://"))
    limiter = ClientLimiter(
        settings.link_clicks_per_minute, settings.broker_url if shared else None
    )

    respond_page = functools.partial(_page, base=page_headers(settings))

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        client = client_address(scope, settings.trusted_proxies)
        # Pages speak the browser's language: the person may not be the customer.
        asked = dict(scope["headers"]).get(b"accept-language", b"").decode("latin-1")
        speech = i18n.from_accept_language(asked)

        def page(name: str, **values: Any) -> bytes:
            return render_page(name, settings, speech, **values)

        if path in ("/r/card-saved", "/r/not-saved") and method in ("GET", "HEAD"):
            name = "card_saved" if path == "/r/card-saved" else "card_not_saved"
            return await respond_page(send, 200, page(name))
        kind, _, token = path[1:].partition("/")
        if not _TOKEN.fullmatch(token):
            return await respond_page(send, 404, page("link_invalid"))
        if not await asyncio.to_thread(limiter.allow, client):
            return await respond_page(send, 429, page("too_many"))
        now = clock.now()
        if kind == "r" and method in ("GET", "HEAD"):
            answer = await asyncio.to_thread(links.redeem, token, now, settings)
        elif kind == "r" and method == "POST":
            choice = await _choice(scope, receive)
            if choice is None:
                return await respond_page(send, 400, page("link_invalid"))
            answer = await asyncio.to_thread(links.redeem, token, now, settings, choice)
        elif kind == "u" and method == "POST":
            answer = await asyncio.to_thread(links.opt_out, token, now)
        elif kind == "u" and method in ("GET", "HEAD"):
            valid = await asyncio.to_thread(links.opt_out_valid, token, now)
            shown = "opt_out_confirm" if valid else "link_invalid"
            return await respond_page(send, 200 if valid else 404, page(shown, action=path))
        else:
            return await respond_page(send, 405, b"")
        if answer.location:
            return await respond_page(send, answer.status, location=answer.location)
        body = page(answer.page or "", **(answer.values or {}))
        return await respond_page(send, answer.status, body)

    return handle


# The choice form is one field; anything longer is not ours.
_CHOICE_BODY_MAX = 256


async def _choice(scope: Scope, receive: Receive) -> links.Choice | None:
    """The customer's choice from the card link's page (a form post)."""
    try:
        body = await read_body(scope, receive, _CHOICE_BODY_MAX)
    except WebhookRejected:
        return None
    fields = parse_qs(body.decode("ascii", "replace"))
    try:
        return links.Choice(fields.get("do", [""])[0])
    except ValueError:
        return None


def embed_headers(settings: Settings, nonce: str, content_type: bytes = b"text/html") -> Headers:
    """The notice's headers: framed only by EMBED_ALLOWED_ORIGINS, its one
    script by nonce, its one request to this origin."""
    ancestors = " ".join(settings.embed_allowed_origins) or "'none'"
    policy = (
        f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}';"
        f" connect-src 'self'; img-src https:; base-uri 'none'; form-action 'none';"
        f" frame-ancestors {ancestors}"
    )
    return [
        (b"content-type", content_type + b"; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-robots-tag", b"noindex, nofollow"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", policy.encode()),
    ]


# notice.js places the notice's iframe where the script tag is, sizes it to
# what the notice says, and takes it away when there is nothing to show.
_NOTICE_JS = """(function () {
  var here = document.currentScript, frame = document.createElement("iframe");
  frame.src = %(src)s;
  frame.title = %(title)s;
  frame.style.cssText = %(style)s;
  window.addEventListener("message", function (e) {
    if (e.source !== frame.contentWindow || typeof e.data !== "string") return;
    if (e.data === "recovery-notice:none") frame.remove();
    var h = /^recovery-notice:height:(\\d+)$/.exec(e.data);
    if (h && %(banner)s) frame.style.height = h[1] + "px";
  });
  here.parentNode.insertBefore(frame, here.nextSibling);
})();
"""
_FRAME_STYLE = {
    "banner": "display:block;width:100%;height:64px;border:0",
    "wall": "position:fixed;top:0;left:0;width:100%;height:100%;border:0;z-index:2147483647",
}


def make_embed_app(settings: Settings) -> Any:
    """The notice a business embeds, behind URLs its backend signs (customers/notice.py)."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if settings.notice_secret is None or scope["method"] not in ("GET", "HEAD"):
            return await respond(send, 404, {"error": "not found"})
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        params = {k: v[0] for k, v in query.items()}
        mode = params.get("mode", "banner")
        mode = mode if mode in notice.MODES else "banner"
        # The business's backend signs with its wall clock; so is it checked.
        customer = notice.verified(settings.notice_secret, params, datetime.now(UTC))
        nonce = secrets.token_urlsafe(12)
        signed = notice.signed_query(
            settings.notice_secret, customer or "", int(params.get("expires", "0") or 0), mode
        )
        if path == "/embed/notice.js":
            script = ""
            if customer is not None:
                script = _NOTICE_JS % {
                    "src": json.dumps(f"{settings.public_base_url}/embed/notice?{signed}"),
                    "title": json.dumps(settings.brand_name),
                    "style": json.dumps(_FRAME_STYLE[mode]),
                    "banner": "true" if mode == "banner" else "false",
                }
            headers = embed_headers(settings, nonce, b"application/javascript")
            return await _page(send, 200, script.encode(), base=headers)
        if path == "/embed/notice/state":
            found = customer is not None and await asyncio.to_thread(_is_open, customer)
            return await respond(send, 200, {"open": bool(found)})
        if path == "/embed/notice/go":
            location = customer and await asyncio.to_thread(_link_for, customer, settings)
            if not location:
                return await _page(send, 404, b"", base=embed_headers(settings, nonce))
            return await _page(send, 303, location=location, base=embed_headers(settings, nonce))
        if path != "/embed/notice":
            return await respond(send, 404, {"error": "not found"})
        found_standing = None
        if customer is not None:
            found_standing = await asyncio.to_thread(_standing_of, customer)
        asked = dict(scope["headers"]).get(b"accept-language", b"").decode("latin-1")
        locale = i18n.from_accept_language(asked)
        ends = None
        if found_standing:
            # The customer's own language where Stripe knows it.
            locale = i18n.choose(found_standing.locale) if found_standing.locale else locale
            ends = ends_on(found_standing, locale)
        body = render_page(
            "notice",
            settings,
            locale,
            standing=found_standing,
            mode=mode,
            ends_on=ends,
            go=f"/embed/notice/go?{signed}",
            state=f"/embed/notice/state?{signed}",
            nonce=nonce,
        )
        return await _page(send, 200, body, base=embed_headers(settings, nonce))

    return handle


def _standing_of(customer: str) -> standing.Standing | None:
    with session_scope() as session:
        return standing.of_customer(session, customer)


def _is_open(customer: str) -> bool:
    with session_scope() as session:
        return standing.is_open(session, customer)


def _link_for(customer: str, settings: Settings) -> str | None:
    with session_scope() as session:
        found = standing.of_customer(session, customer)
        if found is None:
            return None
        url, _expires = standing.fresh_link(session, found, clock.now(), settings, "notice")
        return url


def make_api_app(settings: Settings) -> Any:
    """The status API the business's app reads (business/status_api.py)."""
    shared = settings.broker_url.startswith(("redis://", "rediss://"))
    limiter = ClientLimiter(
        settings.api_requests_per_minute, settings.broker_url if shared else None, kind="api"
    )

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        found = status_api.PATH.fullmatch(scope["path"])
        if found is None:
            return await respond(send, 404, {"error": "not found"})
        if scope["method"] != "GET":
            return await respond(send, 405, {"error": "use GET"})
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        key_id = status_api.key_id_of(presented)
        who = f"key:{key_id}" if key_id else client_address(scope, settings.trusted_proxies)
        if not await asyncio.to_thread(limiter.allow, who):
            return await respond(send, 429, {"error": "too many requests; slow down"})
        status, body = await asyncio.to_thread(
            status_api.answer, presented, found.group(1), clock.now(), settings
        )
        return await respond(send, status, body)

    return handle


# A form post from Twilio is small; anything larger is not Twilio's.
_TWILIO_BODY_MAX = 16_384


def make_twilio_app(settings: Settings) -> Any:
    """What Twilio posts: customers' replies (STOP, START, HELP) and delivery
    reports, each checked with the SDK's validator of X-Twilio-Signature."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if settings.twilio_auth_token is None or path not in ("/twilio/inbound", "/twilio/status"):
            return await respond(send, 404, {"error": "not found"})
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": "use POST"})
        try:
            body = await read_body(scope, receive, _TWILIO_BODY_MAX)
        except WebhookRejected:
            return await respond(send, 413, {"error": "too large"})
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        signature = dict(scope["headers"]).get(b"x-twilio-signature", b"").decode("latin-1")
        url = settings.public_base_url + path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        if not _twilio_signed(settings.twilio_auth_token, url, params, signature):
            return await respond(send, 403, {"error": "bad signature"})
        if path == "/twilio/status":
            await asyncio.to_thread(
                texting.delivery_reported,
                params.get("MessageSid", ""),
                params.get("MessageStatus", ""),
            )
            return await _page(send, 204, base=[])
        said = await asyncio.to_thread(
            texting.answer, params.get("From", ""), params.get("Body", ""), clock.now()
        )
        reply = ""
        if said == "help":
            locale = await asyncio.to_thread(texting.locale_of_number, params.get("From", ""))
            reply = render_help(settings, locale)
        twiml = '<?xml version="1.0" encoding="UTF-8"?><Response>'
        if reply:
            twiml += f"<Message>{escape(reply)}</Message>"
        twiml += "</Response>"
        return await _page(send, 200, twiml.encode(), base=[(b"content-type", b"text/xml")])

    return handle


def _twilio_signed(token: str, url: str, params: dict[str, str], signature: str) -> bool:
    from twilio.request_validator import RequestValidator

    return bool(RequestValidator(token).validate(url, params, signature))


def database_ready() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except (DBAPIError, SQLAlchemyError):
        return False


# /readyz answers within this, whatever the database does.
READY_TIMEOUT_SECONDS = 1.5


class ReadinessProbe:
    """One database probe at a time: when the database stalls, probes wait on
    the one in flight rather than each holding a thread on it."""

    def __init__(self) -> None:
        self._probe: asyncio.Future[bool] | None = None

    async def ready(self) -> bool:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(asyncio.to_thread(database_ready))
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            return False


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


access_log = structlog.get_logger("recovery.access")
_access_records = logging.getLogger("recovery.access")
# A link's path is its bearer token: never written down.
_TOKEN_PATH = re.compile(r"^/([ru])/(?!card-saved$|not-saved$)[^/]*")


def loggable_path(path: str) -> str:
    return _TOKEN_PATH.sub(r"/\1/[redacted]", path)


def with_access_log(app: Any) -> Any:
    """One line per request, without query strings or link tokens."""

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        # Below INFO nothing is written: the webhook path pays nothing for it.
        if scope["type"] != "http" or not _access_records.isEnabledFor(logging.INFO):
            return await app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            access_log.info(
                "request",
                method=scope["method"],
                path=loggable_path(scope["path"]),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )

    return logged


def _read_state() -> metrics.Snapshot:
    with session_scope() as session:
        return metrics.snapshot(session, clock.now())


async def metrics_page(scope: Scope, send: Send, settings: Settings) -> None:
    """Prometheus's scrape: the database's state and the processes' counters."""
    if settings.metrics_token:
        given = dict(scope["headers"]).get(b"authorization", b"")
        wanted = f"Bearer {settings.metrics_token}".encode()
        if not hmac.compare_digest(given, wanted):
            return await respond(send, 401, {"error": "metrics need the bearer token"})
    try:
        body = await asyncio.wait_for(
            asyncio.to_thread(metrics.exposition, _read_state), METRICS_TIMEOUT_SECONDS
        )
    except (TimeoutError, DBAPIError, SQLAlchemyError):
        return await respond(send, 503, {"error": "database unavailable"})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# A scrape gives up after this rather than hold a thread on a stalled database.
METRICS_TIMEOUT_SECONDS = 5.0


def make_app(settings: Settings) -> Any:
    writer = InboxWriter(get_engine())
    customer_pages = make_links_app(settings)
    embedded = make_embed_app(settings)
    api = make_api_app(settings)
    twilio = make_twilio_app(settings)
    readiness = ReadinessProbe()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/webhooks/stripe":
            if method != "POST":
                return await respond(send, 405, {"error": "use POST"})
            return await receive_webhook(scope, receive, send, settings, writer)
        if path.startswith(("/r/", "/u/")):
            return await customer_pages(scope, receive, send)
        if path.startswith("/embed/"):
            return await embedded(scope, receive, send)
        if path.startswith("/api/"):
            return await api(scope, receive, send)
        if path.startswith("/twilio/"):
            return await twilio(scope, receive, send)
        if path == "/healthz":
            return await respond(send, 200, {"status": "ok"})
        if path == "/metrics":
            return await metrics_page(scope, send, settings)
        if path == "/readyz":
            if await readiness.ready():
                return await respond(send, 200, {"status": "ready"})
            return await respond(send, 503, {"status": "database unavailable"})
        await respond(send, 404, {"error": "not found"})

    return with_access_log(app)
