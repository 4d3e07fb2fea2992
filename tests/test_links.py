"""Recovery links over real HTTP: redirects only to Stripe, one page for every
dead link, no token leaks, clicks counted, a per-client limit."""

from __future__ import annotations

import http.client
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from sqlalchemy import event, select, update

from recovery import clock
from recovery.config import ConfigError, get_settings, load_settings
from recovery.customers import links
from recovery.customers.links import allowed_redirect
from recovery.db import get_engine, session_scope
from recovery.engine import scheduler
from recovery.models import LinkPurpose, RecoveryCase, RecoveryLink

from .factories import sim_post


@pytest.fixture
def web(db, sim):
    """The web app (receiver + links) over HTTP, with a small click limit."""
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    server = start_asgi_in_thread(make_app(get_settings()))
    yield server.url
    server.stop()


def get(
    base: str, path: str, method: str = "GET", headers: dict | None = None, body: str | None = None
) -> http.client.HTTPResponse:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    if body is not None:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def open_case(sim, web, behavior: dict | None = None) -> RecoveryCase:
    sim_post(
        sim.url,
        "/_sim/webhook_endpoints",
        {"url": f"{web}/webhooks/stripe", "secret": "whsec_test_current"},
    )
    scenario = sim_post(sim.url, "/_sim/scenarios/failed_invoice", {"behavior": behavior or {}})
    sim.flush()
    scheduler.run_pass(get_settings(), sync=True)
    with session_scope() as session:
        return session.scalars(
            select(RecoveryCase).where(RecoveryCase.invoice_id == scenario["invoice"])
        ).one()


def mint(case: RecoveryCase, purpose=LinkPurpose.UPDATE_CARD, ttl=timedelta(days=14)) -> str:
    with session_scope() as session:
        return links.mint(
            session, purpose, clock.now(), ttl, case_id=case.id, customer_id=case.customer_id
        )


def choose(web: str, token: str, choice: str) -> http.client.HTTPResponse:
    """What the card link's page posts when the customer picks a way out."""
    return get(web, f"/r/{token}", "POST", body=f"do={choice}")


def test_a_card_link_offers_to_pay_now_or_save_a_card_and_makes_no_session_until_asked(sim, web):
    case = open_case(sim, web)
    token = mint(case)
    page = get(web, f"/r/{token}")
    assert page.status == 200 and page.getheader("Location") is None
    text = page.body.decode()
    assert "Pay $20.00 now" in text and "Use a new card from now on" in text
    assert text.count('method="post"') == 2 and token not in text
    # A mail scanner's GET makes nothing at Stripe.
    assert not [o for o in sim.state.objects.values() if o.get("object") == "checkout.session"]
    paying = choose(web, token, "pay")
    assert paying.status == 303
    assert paying.getheader("Location") == f"{sim.url}/hosted/invoices/{case.invoice_id}"
    for body in ("do=steal", "do=", "x" * 300, "do=pay&pad=" + "x" * 300):
        assert get(web, f"/r/{token}", "POST", body=body).status == 400


def test_choosing_a_new_card_opens_a_new_setup_session_on_stripe(sim, web):
    case = open_case(sim, web)
    token = mint(case)
    answer = choose(web, token, "card")
    assert answer.status == 303
    location = answer.getheader("Location")
    assert location.startswith(f"{sim.url}/hosted/checkout/cs_test_")
    session_id = location.rsplit("/", 1)[-1]
    made = sim.state.objects[session_id]
    assert (made["mode"], made["customer"]) == ("setup", case.stripe_customer_id)
    assert made["success_url"].endswith("/r/card-saved") and token not in made["success_url"]
    for header, value in (
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
        ("X-Robots-Tag", "noindex, nofollow"),
    ):
        assert answer.getheader(header) == value
    with session_scope() as session:
        link = session.scalars(select(RecoveryLink)).all()
        clicked = [row for row in link if row.click_count]
    assert len(clicked) == 1 and clicked[0].first_clicked_at is not None
    assert choose(web, token, "card").status == 303  # a second choice, a second session
    with session_scope() as session:
        assert session.get(RecoveryLink, clicked[0].id).click_count == 2


def test_an_authentication_link_goes_straight_to_the_hosted_invoice_page(sim, web):
    case = open_case(sim, web)
    answer = get(web, f"/r/{mint(case, LinkPurpose.AUTHENTICATE)}")
    assert answer.status == 303
    assert answer.getheader("Location") == f"{sim.url}/hosted/invoices/{case.invoice_id}"
    # It offers no choice: only the customer on the invoice's page can authenticate.
    assert choose(web, mint(case, LinkPurpose.AUTHENTICATE), "card").status == 404


def test_dead_links_all_get_one_page_with_one_status(sim, web):
    case = open_case(sim, web)
    expired = mint(case, LinkPurpose.PAY, ttl=timedelta(seconds=-1))
    superseded = mint(case)
    mint(case)  # the newer link for the same purpose supersedes the last
    other = open_case(sim, web, {"decline_code": "expired_card"})
    revoked = mint(other)
    with session_scope() as session:
        links.revoke_case_links(session, other.id, clock.now(), "operator")
    forged = links.new_token()
    answers = [get(web, f"/r/{t}") for t in (forged, expired, superseded, revoked)]
    assert {a.status for a in answers} == {404}
    assert len({a.body for a in answers}) == 1
    assert b"support@example.com" in answers[0].body
    assert all(a.getheader("Location") is None for a in answers)


def test_forged_expired_and_revoked_tokens_do_the_same_database_work(sim, web):
    case = open_case(sim, web)
    expired = mint(case, ttl=timedelta(seconds=-1))
    other = open_case(sim, web, {"decline_code": "expired_card"})
    revoked = mint(other)
    with session_scope() as session:
        links.revoke_case_links(session, other.id, clock.now(), "operator")
    work: list[list[tuple[str, int]]] = []

    def record(conn, cursor, statement, *args):
        work[-1].append((statement, cursor.rowcount))

    event.listen(get_engine(), "after_cursor_execute", record)
    try:
        for token in (links.new_token(), expired, revoked):
            work.append([])
            assert links.redeem(token, clock.now(), get_settings()) is links.INVALID
    finally:
        event.remove(get_engine(), "after_cursor_execute", record)
    forged = work[0]
    # Same statements, each changing no row: a stopwatch learns nothing the
    # page does not say (bench/links.py measures the times).
    assert work == [forged, forged, forged]
    assert any("UPDATE recovery_links" in statement for statement, _rows in forged)
    assert all(rows <= 0 for _statement, rows in forged)
    with session_scope() as session:
        counted = session.scalars(select(RecoveryLink.click_count)).all()
    assert set(counted) == {0}


def test_a_paid_case_shows_all_set(sim, web):
    case = open_case(sim, web)
    token = mint(case)
    sim_post(sim.url, f"/_sim/customers/{case.stripe_customer_id}/cards", {})
    sim_post(sim.url, f"/_sim/invoices/{case.invoice_id}/attempt")
    sim.flush()
    scheduler.run_pass(get_settings(), sync=True)
    answer = get(web, f"/r/{token}")
    assert answer.status == 200 and b"all set" in answer.body


@pytest.mark.parametrize(
    "path",
    [
        "/r/{token}/https://evil.example",
        "/r//evil.example",
        "/r/%2F%2Fevil.example",
        "/r/..%2F..%2Fwebhooks%2Fstripe",
        "/r/https:%2F%2Fevil.example",
        "/r/{token}%00",
    ],
)
def test_crafted_paths_never_redirect(sim, web, path):
    token = mint(open_case(sim, web))
    answer = get(web, path.format(token=token))
    assert answer.status == 404 and answer.getheader("Location") is None


def test_parameters_cannot_steer_the_redirect(sim, web):
    token = mint(open_case(sim, web))
    for query in ("?next=https://evil.example", "?return_to=//evil.example", "?url=javascript:1"):
        answer = get(web, f"/r/{token}{query}", "POST", body="do=card")
        assert answer.status == 303
        assert answer.getheader("Location").startswith(f"{sim.url}/hosted/checkout/")


def test_an_address_off_the_allow_list_is_never_followed(sim, web):
    case = open_case(sim, web)
    with session_scope() as session:
        session.execute(
            update(RecoveryCase)
            .where(RecoveryCase.id == case.id)
            .values(hosted_invoice_url="https://evil.example/pay")
        )
    answer = choose(web, mint(case, LinkPurpose.PAY), "pay")
    assert answer.status == 503 and answer.getheader("Location") is None


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://checkout.stripe.com/c/pay/cs_test_a1", True),
        ("https://invoice.stripe.com/i/acct_1/test_x", True),
        ("http://checkout.stripe.com/c/pay/cs_test_a1", False),
        ("https://checkout.stripe.com.evil.example/c", False),
        ("https://evil.example@checkout.stripe.com/c", False),
        ("https://checkout.stripe.com:8443/c", False),
        ("https://stripe.com.evil.example/", False),
        ("javascript:alert(1)", False),
        ("//checkout.stripe.com/c", False),
        ("", False),
        (None, False),
    ],
)
def test_redirect_allow_list(url, allowed):
    assert allowed_redirect(url, load_settings({})) is allowed


def test_clicks_are_limited_per_client(db, sim, monkeypatch):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    monkeypatch.setenv("LINK_CLICKS_PER_MINUTE", "3")
    get_settings.cache_clear()
    server = start_asgi_in_thread(make_app(get_settings()))
    try:
        forged = links.new_token()
        statuses = [get(server.url, f"/r/{forged}").status for _ in range(5)]
    finally:
        server.stop()
        monkeypatch.delenv("LINK_CLICKS_PER_MINUTE")
        get_settings.cache_clear()
    assert statuses == [404, 404, 404, 429, 429]


def test_the_click_limit_holds_across_web_processes_for_the_client_behind_a_proxy(
    db, sim, redis_url, monkeypatch
):
    import redis

    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    for name, value in {
        "LINK_CLICKS_PER_MINUTE": "4",
        "BROKER_URL": redis_url,
        "TRUSTED_PROXIES": "127.0.0.1,10.0.0.0/8",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    client, neighbour = (f"203.0.113.{n}" for n in secrets.SystemRandom().sample(range(1, 255), 2))
    servers = [start_asgi_in_thread(make_app(get_settings())) for _ in range(2)]
    forged = links.new_token()

    def click(server, address: str, proxies: str = "10.1.2.3") -> int:
        forwarded = {"X-Forwarded-For": f"{address}, {proxies}"}
        return get(server.url, f"/r/{forged}", headers=forwarded).status

    try:
        statuses = [click(servers[n % 2], client) for n in range(6)]
        other = click(servers[1], neighbour)
        # Behind the proxy the client cannot pick its address: what it puts
        # first in the header is not what the limit keys on.
        spoofed = click(servers[0], "198.51.100.1", proxies=f"{client}, 10.1.2.3")
    finally:
        for server in servers:
            server.stop()
        redis.Redis.from_url(redis_url).delete(
            *(f"recovery:ratelimit:clicks:{a}" for a in (client, neighbour))
        )
        get_settings.cache_clear()
    assert statuses == [404, 404, 404, 404, 429, 429]
    assert (other, spoofed) == (404, 429)


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("198.51.100.7", "203.0.113.9", "198.51.100.7"),  # not a proxy of ours: its own address
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
        ("127.0.0.1", "", "127.0.0.1"),
        ("127.0.0.1", "10.0.0.2", "10.0.0.2"),  # only proxies: the farthest
    ],
)
def test_the_client_address_is_the_first_one_before_our_proxies(peer, forwarded, client):
    from recovery.web import client_address

    trusted = load_settings({"TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"}).trusted_proxies
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    assert client_address({"client": (peer, 1234), "headers": headers}, trusted) == client


def test_trusted_proxies_must_be_addresses():
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        load_settings({"TRUSTED_PROXIES": "10.0.0.0/8, proxy.internal"})


def test_opt_out_needs_a_post_and_takes_effect_at_once(sim, web):
    case = open_case(sim, web)
    with session_scope() as session:
        token = links.mint(
            session,
            LinkPurpose.OPT_OUT,
            clock.now(),
            timedelta(days=1),
            customer_id=case.customer_id,
        )
    shown = get(web, f"/u/{token}")
    assert shown.status == 200 and b'<form method="post"' in shown.body
    from recovery.models import Customer

    with session_scope() as session:
        assert session.get(Customer, case.customer_id).reminders_opted_out_at is None
    assert get(web, f"/u/{token}", method="POST").status == 200
    with session_scope() as session:
        assert session.get(Customer, case.customer_id).reminders_opted_out_at is not None
    # An opt-out token opens no payment page, and a payment link stops nothing.
    assert get(web, f"/r/{token}").status == 404
    assert get(web, f"/u/{mint(case)}", method="POST").status == 404


def test_paying_now_from_a_card_link_recovers_the_case_credited_to_the_link(sim, web):
    import json
    import urllib.request

    case = open_case(sim, web, {"decline_code": "expired_card"})
    hosted = choose(web, mint(case), "pay").getheader("Location")
    request = urllib.request.Request(
        hosted,
        data=json.dumps({"card": {"brand": "visa", "last4": "4242"}}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as paid:
        assert json.loads(paid.read())["status"] == "paid"
    sim.flush()
    scheduler.run_pass(get_settings(), sync=True)
    with session_scope() as session:
        found = session.get(RecoveryCase, case.id)
        assert (found.status, found.recovery_path) == ("recovered", "link")


def test_pages_speak_the_browsers_language(sim, web):
    case = open_case(sim, web)
    token = mint(case)
    german = get(web, f"/r/{token}", headers={"Accept-Language": "de-CH,de;q=0.9,en;q=0.5"})
    text = german.body.decode()
    assert '<html lang="de">' in text and "<title>Zahlung erledigen · Our service</title>" in text
    assert "Ab jetzt eine neue Karte verwenden" in text and "Use a new card" not in text
    japanese = get(web, "/r/not-a-real-token", headers={"Accept-Language": "nl, ja;q=0.8"})
    assert japanese.status == 404 and "このリンクは有効期限切れです" in japanese.body.decode()
    english = get(web, "/r/card-saved").body.decode()
    assert '<html lang="en">' in english and "Thank you, your card is saved" in english


def test_the_choice_page_writes_the_amount_in_its_readers_language(sim, web):
    case = open_case(sim, web)
    token = mint(case)
    german = get(web, f"/r/{token}", headers={"Accept-Language": "de"}).body.decode()
    assert "Jetzt 20,00\xa0$ bezahlen" in german
    japanese = get(web, f"/r/{token}", headers={"Accept-Language": "ja"}).body.decode()
    assert "今すぐ $20.00 を支払う" in japanese
