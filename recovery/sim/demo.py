"""A month of failed renewals, worked by the real product on a simulated clock.

Nothing here is scripted to succeed. The Stripe-compatible server declines
each renewal as its card would; the signed webhook goes over HTTP to the real
receiver; `tick` passes (the production code path) classify, plan, retry and
email, hour by simulated hour; simulated customers read the .eml files the
outbox wrote, open some, click the links in them over HTTP and, on Stripe's
pages, save a new card or authenticate. Recoveries are whatever follows.

    members ─▶ simulator: renewal declined ─signed webhook─▶ receiver ─▶ inbox
    every simulated hour: customers act; tick if anything is due (events,
    steps, emails) ─▶ .eml ─▶ customers read
"""

from __future__ import annotations

import html
import http.client
import json
import os
import random
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, case, func, select, text

from recovery import clock, ratelimit, stats, stripe_api
from recovery.config import get_settings
from recovery.customers import mailer
from recovery.db import get_engine, reset_engine, session_scope, upgrade
from recovery.engine import scheduler
from recovery.models import CaseStatus, RecoveryCase
from recovery.observability import configure
from recovery.sim import rules
from recovery.sim.population import Member
from recovery.sim.server import StripeSim
from recovery.sim.servers import start_asgi_in_thread, start_wsgi_in_thread
from recovery.web import make_app

START = datetime(2026, 10, 1, tzinfo=UTC)
_SECRET = "whsec_recovery_demo"  # noqa: S105 - the in-process simulator's, nothing else's


@dataclass
class Action:
    at: datetime
    member: Member
    url: str


@dataclass(frozen=True)
class CaseRow:
    """One failed renewal as it ended: what was at stake and what came back."""

    failed_at: datetime
    currency: str
    amount: int
    recovered: int
    category: str = "unknown"  # the plan's category on the first failure


@dataclass
class Outcome:
    stats: dict
    checks: dict[str, bool]
    emails_opened: int = 0
    links_clicked: int = 0
    cards_saved: int = 0
    authenticated: int = 0
    paid_on_page: int = 0  # paid at once on the invoice's page, offered by our link
    sms_read: int = 0
    notices_seen: int = 0  # visits to the app that showed the notice
    # Attempts that broke a card network's rule, by rule (sim/rules.py).
    violations: dict[str, int] = field(default_factory=dict)
    cases: list[CaseRow] = field(default_factory=list)


@contextmanager
def embedded(
    workdir: Path, plans_file: str | None, settings: dict[str, str] | None = None
) -> Iterator[None]:
    """The process configured for one run in `workdir` (with `settings` on
    top), restored afterwards."""
    overrides = {
        "RECOVERY_ENV": "development",
        "DATABASE_URL": f"sqlite:///{workdir / 'recovery.sqlite3'}",
        "BROKER_URL": "memory://",
        "STRIPE_API_KEY": "sk_test_recovery_demo",
        "STRIPE_WEBHOOK_SECRET": _SECRET,
        "OUTBOX_DIR": str(workdir / "outbox"),
        "SMTP_HOST": "",
        "SMS_DIR": str(workdir / "sms"),
        # Email alone unless a policy adds SMS (SMS_MAX_PER_CASE) or the
        # notice in the business's app (NOTICE_SECRET): `recovery simulate`
        # compares them.
        "SMS_MAX_PER_CASE": "0",
        "NOTICE_SECRET": "",
        # The simulator is in this process: no reason to pace requests to it.
        "STRIPE_WRITE_RATE": "10000",
        "STRIPE_READ_RATE": "10000",
        "LINK_CLICKS_PER_MINUTE": "100000",
        "RECOVERY_PLANS_FILE": plans_file or "",
        # The summary tells the story; flagged cases and the like are in it.
        "LOG_LEVEL": "ERROR",
        **(settings or {}),
    }
    saved = {key: os.environ.get(key) for key in [*overrides, "STRIPE_API_BASE", "PUBLIC_BASE_URL"]}
    os.environ.update(overrides)
    _refresh_settings()
    configure(get_settings())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _refresh_settings()
        clock.set_now(None)


def _post(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def open_link(url: str, choice: str) -> tuple[str | None, bool]:
    """Open a recovery link as a browser would, without following the last
    redirect: its target, and whether `choice` was posted on the page that
    offers to pay now or to save a card."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None, False
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        answer = conn.getresponse()
        page = answer.read()
        chose = answer.status == 200 and b'name="do"' in page
        if chose:
            conn.request(
                "POST",
                parts.path,
                body=f"do={choice}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            answer = conn.getresponse()
            answer.read()
        return (answer.getheader("Location") if answer.status == 303 else None), chose
    finally:
        conn.close()


class Customers:
    """The simulated people: they read their mail and sometimes act on it."""

    def __init__(self, members: list[Member], seed: int, outbox: Path, sms_dir: Path):
        self.by_email = {m.email: m for m in members}
        self.by_phone = {m.phone: m for m in members if m.phone}
        self.app_users = [m for m in members if m.app_visits_per_week > 0]
        self.seed = seed
        self.outbox = outbox
        self.sms_dir = sms_dir
        self.seen: set[str] = set()
        self.received: Counter[int] = Counter()  # emails per member so far
        self.pending: list[Action] = []
        self.customers: dict[int, str] = {}  # member index → Stripe customer id
        self.counts = {
            "opened": 0,
            "clicked": 0,
            "cards_saved": 0,
            "authenticated": 0,
            "paid_on_page": 0,
            "sms_read": 0,
            "notices_seen": 0,
        }

    def read_mail(self, now: datetime) -> None:
        if not self.outbox.exists():
            return
        # File names start with the time they were written: sorted is sent order.
        new = sorted(
            entry.name
            for entry in os.scandir(self.outbox)
            if entry.name.endswith(".eml") and entry.name not in self.seen
        )
        for name in new:
            self.seen.add(name)
            message = message_from_bytes((self.outbox / name).read_bytes(), policy=policy.default)
            member = self.by_email.get(message["To"])
            if member is None:
                continue
            body = message.get_body(("plain",))
            text = body.get_content() if body is not None else ""
            link = next((w for w in text.split() if "/r/" in w), None)
            # One draw per member and email, named by the seed, the member and
            # which of their emails this is: not by its wording, nor by how
            # other members' emails interleave with theirs.
            self.received[member.index] += 1
            rng = random.Random(f"{self.seed}:{member.index}:{self.received[member.index]}")
            habits = member.habits
            if rng.random() >= habits.opens:
                continue
            self.counts["opened"] += 1
            if link is None or rng.random() >= habits.clicks:
                continue
            delay = timedelta(hours=rng.uniform(*habits.delay_hours))
            self.pending.append(Action(now + delay, member, link))

    def read_sms(self, now: datetime) -> None:
        """The SMS the file sink wrote: read more than email, tapped less."""
        if not self.sms_dir.exists():
            return
        for path in sorted(self.sms_dir.glob("*.txt")):
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            sent = json.loads(path.read_text())
            member = self.by_phone.get(sent["to"])
            if member is None:
                continue
            rng = random.Random(f"{self.seed}:{member.index}:sms:{path.name}")
            if rng.random() >= member.habits.reads_sms:
                continue
            self.counts["sms_read"] += 1
            link = next((w for w in sent["body"].split() if "/r/" in w), None)
            if link is None or rng.random() >= member.habits.taps_sms:
                continue
            delay = timedelta(minutes=rng.uniform(5, 240))
            self.pending.append(Action(now + delay, member, link))

    def visit_app(self, now: datetime, web_url: str, secret: str) -> None:
        """This hour's visits to the business's app, which shows the notice
        while a payment is being recovered."""
        from recovery.customers import notice, standing

        for member in self.app_users:
            if member.fails_at > now:
                continue
            rng = random.Random(f"{self.seed}:{member.index}:visit:{now.isoformat()}")
            if rng.random() >= member.app_visits_per_week / (7 * 24):
                continue
            customer = self.customers.get(member.index)
            if customer is None:
                continue
            with session_scope() as session:
                if not standing.is_open(session, customer):
                    continue
            url = notice.signed_url(web_url, secret, customer)
            with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 - ours
                page = answer.read().decode()
            if 'id="recovery-notice"' not in page:
                continue
            self.counts["notices_seen"] += 1
            if rng.random() >= member.habits.acts_on_notice:
                continue
            go = re.search(r'href="(/embed/notice/go\?[^"]+)"', page)
            if go is None:
                continue
            link = _location(web_url + html.unescape(go.group(1)))
            if link is not None:
                self.pending.append(
                    Action(now + timedelta(minutes=rng.uniform(1, 20)), member, link)
                )

    def act(self, now: datetime, sim_url: str) -> int:
        due = [a for a in self.pending if a.at <= now]
        self.pending = [a for a in self.pending if a.at > now]
        for action in due:
            self.counts["clicked"] += 1
            rng = random.Random(f"{self.seed}:{action.member.index}:{action.at.isoformat()}")
            choice = "pay" if rng.random() < action.member.habits.pays_now else "card"
            target, chose = open_link(action.url, choice)
            if target is None or rng.random() >= action.member.habits.completes:
                continue
            card = {"brand": rng.choice(("visa", "mastercard")), "last4": "4242"}
            done = finish_on_page(target, chose, card)
            if done is not None:
                self.counts[done] += 1
        return len(due)


def _location(url: str) -> str | None:
    """Where a GET of one of our URLs redirects to."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        answer = conn.getresponse()
        answer.read()
        return answer.getheader("Location") if answer.status == 303 else None
    finally:
        conn.close()


def finish_on_page(target: str, chose: bool, card: dict) -> str | None:
    """On the Stripe page a link led to, do what the customer came for: save
    `card` on Checkout; on the invoice's page pay with it if the customer
    chose to pay, else authenticate with the card on file. What was done, as
    Customers counts it, or None if the page refused."""
    if "/hosted/checkout/" in target:
        return "cards_saved" if _post(target, {"card": card})[0] == 200 else None
    if "/hosted/invoices/" in target:
        paying = {"card": card} if chose else None
        if _post(target, paying)[0] == 200:
            return "paid_on_page" if paying else "authenticated"
    return None


def run(
    members: list[Member],
    seed: int,
    days: int,
    workdir: Path,
    plans_file: str | None = None,
    progress: Callable[[int], None] | None = None,
    settings: dict[str, str] | None = None,
    fresh: bool = True,
    every_hour: bool = False,
) -> Outcome:
    """One simulated month for `members`; the database and outbox stay in
    `workdir`, emptied first unless the caller did (`fresh` False). An hour
    with nothing due gets no pass unless `every_hour`: the same run, sooner."""
    if fresh:
        clear(workdir)
    with embedded(workdir, plans_file, settings):
        return _run(members, seed, days, workdir, progress, every_hour)


# Marks a directory a run made, so the next run may empty it.
RUN_MARK = ".recovery-run"
# What a run writes (a directory holding only these was made by an older run).
RUN_FILES = frozenset(
    {RUN_MARK, "report.html", "outbox", "sms", "compare"}
    | {f"recovery.sqlite3{suffix}" for suffix in ("", "-journal", "-wal", "-shm")}
)


class NotARunDirectory(Exception):
    """The directory holds files no run put there: it is never emptied."""


def clear(workdir: Path) -> None:
    """An empty `workdir` for a run: new, empty, or made by an earlier run.
    Anything else is someone's data, and is left alone."""
    if workdir.exists():
        if not workdir.is_dir():
            raise NotARunDirectory(f"{workdir} is a file")
        found = {entry.name for entry in workdir.iterdir()}
        if found and RUN_MARK not in found and not found <= RUN_FILES:
            raise NotARunDirectory(
                f"{workdir} holds files a run did not write ({', '.join(sorted(found)[:3])}…);"
                " name a new or empty directory"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / RUN_MARK).write_text("made by recovery demo or simulate: its next run empties it\n")


def _run(
    members: list[Member],
    seed: int,
    days: int,
    workdir: Path,
    progress: Callable[[int], None] | None,
    every_hour: bool,
) -> Outcome:
    upgrade(os.environ["DATABASE_URL"])
    # The simulated Stripe keeps the same simulated time as the engine.
    sim = StripeSim(clock=clock.now)
    sim_server = start_wsgi_in_thread(sim.wsgi)
    sim.state.base_url = sim_server.url
    os.environ["STRIPE_API_BASE"] = sim_server.url
    _refresh_settings()
    # Links point at this receiver, where the customers click: those the
    # engine mints and those the web app itself mints (the notice's).
    port = _free_port()
    os.environ["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    _refresh_settings()
    settings = get_settings()
    web = start_asgi_in_thread(make_app(settings), port=port)
    customers = Customers(members, seed, workdir / "outbox", workdir / "sms")
    invoices: dict[str, Member] = {}
    try:
        _post(
            f"{sim_server.url}/_sim/webhook_endpoints",
            {"url": f"{web.url}/webhooks/stripe", "secret": _SECRET},
        )
        queue = list(members)
        hours = days * 24
        for hour in range(hours + 1):
            now = START + timedelta(hours=hour)
            clock.set_now(now)
            while queue and queue[0].fails_at <= now:
                member = queue.pop(0)
                made = _post(
                    f"{sim_server.url}/_sim/scenarios/failed_invoice",
                    {
                        "email": member.email,
                        "name": member.name,
                        "amount": member.amount,
                        "currency": member.currency,
                        "card": member.card(),
                        "behavior": member.card()["behavior"],
                        "other_cards": [member.other_card] if member.other_card else [],
                        "phone": member.phone,
                        "metadata": {"sms_consent": "true"} if member.phone else {},
                    },
                )[1]
                invoices[made["invoice"]] = member
                customers.customers[member.index] = made["customer"]
            customers.act(now, sim_server.url)
            sim.flush()
            if every_hour or scheduler.anything_due(now):
                scheduler.run_pass(settings, sync=True)
                sim.flush()
            customers.read_mail(now)
            customers.read_sms(now)
            if settings.notice_secret:
                customers.visit_app(now, web.url, settings.notice_secret)
            if progress:
                progress(1)
        with session_scope() as session:
            numbers = stats.compute(session)
            rows = [
                CaseRow(
                    r.first_failed_at or r.opened_at,
                    r.currency,
                    r.amount_due,
                    r.recovered,
                    r.first_category or r.category or "unknown",
                )
                for r in session.execute(
                    select(
                        RecoveryCase.first_failed_at,
                        RecoveryCase.opened_at,
                        RecoveryCase.currency,
                        RecoveryCase.amount_due,
                        RecoveryCase.first_category,
                        RecoveryCase.category,
                        case(
                            (
                                RecoveryCase.status == CaseStatus.RECOVERED,
                                func.coalesce(RecoveryCase.amount_recovered, 0),
                            ),
                            else_=0,
                        ).label("recovered"),
                    )
                )
            ]
        broken = rules.violations(
            (o for o in sim.state.objects.values() if o.get("object") == "charge"),
            settings.visa_max_attempts_30d,
        )
        checks = _checks(numbers, sim, invoices, get_engine())
        checks["no card-network retry rule broken"] = not any(broken.values())
    finally:
        web.stop()
        sim_server.stop()
    outcome = Outcome(numbers, checks, violations=broken, cases=rows)
    outcome.emails_opened = customers.counts["opened"]
    outcome.links_clicked = customers.counts["clicked"]
    outcome.cards_saved = customers.counts["cards_saved"]
    outcome.authenticated = customers.counts["authenticated"]
    outcome.paid_on_page = customers.counts["paid_on_page"]
    outcome.sms_read = customers.counts["sms_read"]
    outcome.notices_seen = customers.counts["notices_seen"]
    return outcome


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _refresh_settings() -> None:
    """Everything built from the settings, built again from the environment."""
    get_settings.cache_clear()
    stripe_api.client.cache_clear()
    ratelimit.shared_bucket.cache_clear()
    ratelimit.read_bucket.cache_clear()
    mailer.transport_for.cache_clear()
    reset_engine()


def _checks(
    numbers: dict[str, Any], sim: StripeSim, invoices: dict[str, Member], engine: Engine
) -> dict[str, bool]:
    """What must hold whatever the outcome: sums that add up, and agreement
    with the Stripe-compatible server."""
    paid: dict[str, int] = {}
    for invoice_id in invoices:
        invoice = sim.state.objects[invoice_id]
        if invoice["status"] == "paid":
            paid[invoice["currency"]] = paid.get(invoice["currency"], 0) + invoice["amount_paid"]
    statuses = {k: v for k, v in numbers["cases"].items() if k != "total"}
    with engine.connect() as conn:
        cases = conn.execute(text("SELECT count(*) FROM recovery_cases")).scalar()
    # One subscriber, one customer, one invoice: a second successful charge
    # for a customer would be a double charge.
    charged: dict[str, int] = {}
    for obj in sim.state.objects.values():
        if obj.get("object") == "charge" and obj.get("paid"):
            charged[obj["customer"]] = charged.get(obj["customer"], 0) + 1
    return {
        "one case per failed renewal": cases == len(invoices),
        "every case in exactly one state": sum(statuses.values()) == numbers["cases"]["total"],
        "recovered amounts match the server's paid invoices": numbers["recovered"]["amount"]
        == dict(sorted(paid.items())),
        "recoveries add up across paths": sum(p["recovered"] for p in numbers["by_path"])
        == numbers["recovered"]["count"],
        "no invoice paid twice": all(count <= 1 for count in charged.values()),
        # The server logs every pay request that charged a card: our count of
        # retries must be exactly those, no step that charged nothing.
        "retries counted are the server's charges": numbers["retries"]["made"]
        == len(sim.state.charges),
    }
