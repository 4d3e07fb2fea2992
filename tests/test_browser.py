"""The card link's page in a real headless Chromium: a person sees both ways
out and each button takes them to Stripe's page for it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from recovery.config import get_settings

from .conftest import REQUIRE_SERVICES
from .test_links import mint, open_case

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def web(db, sim):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    server = start_asgi_in_thread(make_app(get_settings()))
    yield server.url
    server.stop()


@pytest.fixture
def browser() -> Iterator:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "Debian's chromium and chromium-driver are not installed"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} and CI=true", pytrace=False)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="recovery-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No background traffic: this machine's network is closed.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _button(driver, text: str):
    from selenium.webdriver.common.by import By

    found = [b for b in driver.find_elements(By.TAG_NAME, "button") if text in b.text]
    assert len(found) == 1, [b.text for b in driver.find_elements(By.TAG_NAME, "button")]
    return found[0]


def _lands_on(driver, prefix: str) -> str:
    """Where the browser arrives after a click, once it has left our page."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.current_url.startswith(prefix))
    return driver.current_url


def test_a_person_can_pay_now_or_save_a_card_from_one_link(sim, web, browser):
    case = open_case(sim, web, {"decline_code": "expired_card"})
    token = mint(case)
    browser.get(f"{web}/r/{token}")
    assert browser.title.startswith("Settle your payment")
    assert "did not go through" in browser.page_source

    _button(browser, "Pay $20.00 now").click()
    hosted = _lands_on(browser, sim.url)
    assert hosted == f"{sim.url}/hosted/invoices/{case.invoice_id}"

    browser.get(f"{web}/r/{token}")
    _button(browser, "Use a new card from now on").click()
    checkout = _lands_on(browser, sim.url)
    assert checkout.startswith(f"{sim.url}/hosted/checkout/cs_test_")
    session_id = checkout.rsplit("/", 1)[-1]
    made = sim.state.objects[session_id]
    assert (made["mode"], made["customer"]) == ("setup", case.stripe_customer_id)
