"""The notice a business embeds, in a real headless Chromium, inside a page
served from another origin, at a phone's width and a desktop's."""

from __future__ import annotations

import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import update

from recovery.config import get_settings
from recovery.customers import notice
from recovery.db import session_scope
from recovery.models import CaseStatus, Customer, RecoveryCase

from .conftest import free_port
from .test_links import open_case

SECRET = "n" * 40
WIDTHS = {"phone": (375, 740), "desktop": (1280, 800)}


class HostSite:
    """The business's app: another origin, serving the pages tests ask for."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                body = site.pages.get(self.path, "").encode()
                self.send_response(200 if body else 404)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        # localhost, not 127.0.0.1: another origin than the app's.
        self.origin = f"http://localhost:{self.server.server_address[1]}"

    def page(self, path: str, body: str) -> str:
        self.pages[path] = f"<!doctype html><html><body><h1>The app</h1>{body}</body></html>"
        return self.origin + path


@pytest.fixture
def site():
    host = HostSite()
    yield host
    host.server.shutdown()
    host.server.server_close()


@pytest.fixture
def web(db, sim, site, monkeypatch):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("NOTICE_SECRET", SECRET)
    monkeypatch.setenv("EMBED_ALLOWED_ORIGINS", site.origin)
    monkeypatch.setenv("PUBLIC_BASE_URL", base)
    get_settings.cache_clear()
    server = start_asgi_in_thread(make_app(get_settings()), port=port)
    yield base
    server.stop()
    for name in ("NOTICE_SECRET", "EMBED_ALLOWED_ORIGINS", "PUBLIC_BASE_URL"):
        monkeypatch.delenv(name)
    get_settings.cache_clear()


def in_frame(driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    frame = WebDriverWait(driver, 10).until(lambda d: d.find_element(By.TAG_NAME, "iframe"))
    driver.switch_to.frame(frame)
    return frame


@pytest.mark.parametrize("width", WIDTHS)
def test_a_banner_in_the_customers_language_at_phone_and_desktop_width(
    sim, web, site, browser, width
):
    from selenium.webdriver.common.by import By

    case = open_case(sim, web, {"decline_code": "expired_card"})
    with session_scope() as session:
        session.execute(update(Customer).where(Customer.id == case.customer_id).values(locale="fr"))
    url = notice.signed_url(web, SECRET, case.stripe_customer_id, script=True)
    browser.set_window_size(*WIDTHS[width])
    browser.get(site.page("/account", f'<script src="{url}"></script><p>Your account</p>'))
    frame = in_frame(browser)
    banner = browser.find_element(By.ID, "recovery-notice")
    assert "Ajoutez une nouvelle carte" in banner.text and "20,00" in banner.text
    button = browser.find_element(By.CSS_SELECTOR, "a.fix")
    assert button.is_displayed() and button.text == "Régler maintenant"
    # Nothing overflows the frame, and the frame is as tall as the banner.
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
    )
    needed = browser.execute_script("return document.documentElement.scrollHeight")
    browser.switch_to.default_content()
    assert abs(frame.size["height"] - needed) <= 2 and frame.size["width"] <= WIDTHS[width][0]
    # The button takes the whole page to our link, then on to fix the card.
    in_frame(browser)
    browser.find_element(By.CSS_SELECTOR, "a.fix").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda d: d.current_url.startswith(web + "/r/"))


def test_a_wall_covers_the_app_and_goes_away_once_the_case_recovers(sim, web, site, browser):
    from selenium.webdriver.common.by import By

    case = open_case(sim, web, {"decline_code": "insufficient_funds"})
    url = notice.signed_url(web, SECRET, case.stripe_customer_id, mode="wall", script=True)
    browser.set_window_size(*WIDTHS["phone"])
    page = site.page("/home", f'<script src="{url}"></script>')
    browser.get(page)
    frame = in_frame(browser)
    assert "Your last payment did not go through." in browser.find_element(By.TAG_NAME, "h1").text
    browser.switch_to.default_content()
    assert frame.size["width"] == browser.execute_script("return window.innerWidth")
    assert frame.size["height"] == browser.execute_script("return window.innerHeight")
    with session_scope() as session:
        session.execute(
            update(RecoveryCase)
            .where(RecoveryCase.id == case.id)
            .values(status=CaseStatus.RECOVERED)
        )
    browser.get(page)
    from selenium.webdriver.support.ui import WebDriverWait

    # notice.js takes its frame away when there is nothing to show.
    WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.TAG_NAME, "iframe"))


def test_forged_expired_or_foreign_signatures_show_nothing(sim, web, site, browser):
    case = open_case(sim, web, {"decline_code": "expired_card"})
    customer = case.stripe_customer_id
    good = notice.signed_url(web, SECRET, customer)
    expires = int(good.split("expires=")[1].split("&")[0])
    tampered = [
        good.replace(customer, "cus_someone_else"),  # another customer, same signature
        good.replace(f"expires={expires}", f"expires={expires + 3600}"),  # a longer life
        notice.signed_url(web, "f" * 40, customer),  # another business's secret
        notice.signed_url(web, SECRET, customer, ttl=timedelta(seconds=-5)),  # expired
        notice.signed_url(web, SECRET, customer, ttl=timedelta(days=2)),  # too long a life
    ]
    for url in tampered:
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert b'recovery-notice"' not in answer.read(), url
    with urllib.request.urlopen(good, timeout=10) as answer:
        assert b'id="recovery-notice"' in answer.read()
    # In the browser, a forged one leaves an empty frame.
    browser.get(site.page("/forged", f'<iframe src="{tampered[0]}"></iframe>'))
    in_frame(browser)
    assert browser.execute_script("return document.body.innerText.trim()") == ""


def test_only_the_allowed_origins_may_frame_it(sim, web, site):
    case = open_case(sim, web, {"decline_code": "expired_card"})
    url = notice.signed_url(web, SECRET, case.stripe_customer_id)
    with urllib.request.urlopen(url, timeout=10) as answer:
        policy = answer.headers["content-security-policy"]
    assert f"frame-ancestors {site.origin}" in policy
    assert "script-src 'nonce-" in policy and "unsafe-inline" not in policy.split("script-src")[1]


def test_the_signature_recipe_is_the_documented_one():
    import hashlib
    import hmac

    expires = int(datetime.now(UTC).timestamp()) + 600
    recipe = hmac.new(SECRET.encode(), f"cus_123.{expires}".encode(), hashlib.sha256).hexdigest()
    assert notice.signature(SECRET, "cus_123", expires) == recipe
    params = {"customer": "cus_123", "expires": str(expires), "sig": recipe}
    assert notice.verified(SECRET, params, datetime.now(UTC)) == "cus_123"
