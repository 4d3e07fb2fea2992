"""The card link's page in a real headless Chromium: a person sees both ways
out and each button takes them to Stripe's page for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from recovery.config import get_settings

from .test_links import mint, open_case


@pytest.fixture
def web(db, sim):
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    server = start_asgi_in_thread(make_app(get_settings()))
    yield server.url
    server.stop()


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


def test_a_person_can_pay_now_or_save_a_card_from_one_link(sim, web, browser, screenshots):
    case = open_case(sim, web, {"decline_code": "expired_card"})
    token = mint(case)
    browser.get(f"{web}/r/{token}")
    assert browser.title.startswith("Settle your payment")
    assert "did not go through" in browser.page_source
    for size, name in ((PHONE, "choice-phone"), (DESKTOP, "choice-desktop")):
        fits(browser, size)
        screenshot(browser, name, screenshots)

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


PHONE, DESKTOP = (390, 844), (1280, 900)


def screenshot(driver, name: str, where: Path) -> Path:
    """Kept for a person to look at (RECOVERY_SCREENSHOTS names a directory
    to keep them in after the run); checked here for what a test can see."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000  # a page, not a blank
    return path


def fits(driver, size: tuple[int, int]) -> None:
    """At this window size nothing makes the page scroll sideways, and the
    text is large enough to read."""
    driver.set_window_size(*size)
    wide = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert wide[0] <= wide[1], f"the page is {wide[0]}px wide in a {wide[1]}px window"
    smallest = driver.execute_script(
        "return Math.min(...[...document.querySelectorAll('body *')]"
        ".filter(e => e.offsetParent && e.childNodes.length && [...e.childNodes]"
        ".some(n => n.nodeType === 3 && n.textContent.trim()))"
        ".map(e => parseFloat(getComputedStyle(e).fontSize)))"
    )
    assert smallest >= 12, f"text of {smallest}px"


@pytest.fixture
def screenshots(tmp_path) -> Path:
    import os

    kept = os.environ.get("RECOVERY_SCREENSHOTS")
    return Path(kept) if kept else tmp_path / "screenshots"


def test_the_report_reads_on_a_phone_and_its_charts_show_their_axes(browser, tmp_path, screenshots):
    from selenium.webdriver.common.by import By

    from recovery.report import render
    from recovery.sim import demo, population

    stats = demo.run(population.synthetic(40, 5, demo.START), 5, 30, tmp_path / "run").stats
    page = tmp_path / "report.html"
    from datetime import UTC, datetime

    checks = {"one case per failed renewal": True, "no invoice paid twice": False}
    headline = "against Stripe's recommended schedule: 64.1% vs 58.3%, +5.8 points"
    page.write_text(render(stats, get_settings(), "Recovery", datetime.now(UTC), headline, checks))
    browser.get(page.as_uri())
    # The run's headline and its checks come first, each check marked.
    first = browser.find_element(By.CSS_SELECTOR, "main > :nth-child(3)")
    assert headline in first.text and "no invoice paid twice" in first.text
    assert [e.get_attribute("class") for e in first.find_elements(By.CSS_SELECTOR, "li")] == [
        "ok",
        "failed",
    ]
    for size, name in ((PHONE, "report-phone"), (DESKTOP, "report-desktop")):
        fits(browser, size)
        charts = browser.find_elements(By.CSS_SELECTOR, "svg.hbars")
        assert len(charts) == 3
        rate_axis = [t.text for t in charts[0].find_elements(By.CSS_SELECTOR, ".axis text")]
        assert rate_axis == ["0%", "50%", "100%"]
        column = charts[0].find_element(By.XPATH, "..").size["width"]
        for chart in browser.find_elements(By.CSS_SELECTOR, "svg.chart"):
            # The chart fills its column, on a phone too, and its text is
            # drawn at least 12 px high however the chart is scaled.
            assert chart.size["width"] > 0.8 * min(column, 480) - 40, (chart.size, column)
            drawn = browser.execute_script(
                "const svg = arguments[0];"
                "const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;"
                "return Math.min(...[...svg.querySelectorAll('text')].map("
                "t => parseFloat(getComputedStyle(t).fontSize) * scale))",
                chart,
            )
            assert drawn >= 12, f"chart text of {drawn:.1f}px at {size}"
        for cause, row in zip(
            stats["by_cause"], charts[0].find_elements(By.CSS_SELECTOR, ".row"), strict=True
        ):
            bar = float(row.find_element(By.CSS_SELECTOR, ".bar").get_attribute("width"))
            track = float(row.find_element(By.CSS_SELECTOR, ".track").get_attribute("width"))
            assert abs(bar - cause["rate"] * track) <= 0.1, (cause, bar, track)
        days = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "svg.vbars .days text")]
        assert days[0] == stats["over_time"][0]["day"]
        assert days[-1] == stats["over_time"][-1]["day"]
        top = max(d["recovered"] for d in stats["over_time"])
        counts = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "svg.vbars .ticks text")]
        assert counts == [f"{top:g}", f"{top / 2:g}", "0"]
        screenshot(browser, name, screenshots)


# -- the walk from the email's link to a recovered case, on Stripe's pages -------


@pytest.fixture
def linked_to(db, sim, monkeypatch):
    """A web app whose PUBLIC_BASE_URL is its own address, as in a deployment:
    the emails' links and Checkout's way back lead to it."""
    from recovery.sim.servers import start_asgi_in_thread
    from recovery.web import make_app

    from .conftest import free_port

    port = free_port()
    monkeypatch.setenv("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
    get_settings.cache_clear()
    server = start_asgi_in_thread(make_app(get_settings()), port=port)
    yield server.url
    server.stop()
    monkeypatch.undo()
    get_settings.cache_clear()


def emailed_link(case, web: str, before: set[Path]) -> str:
    """The link in the email this case's customer was just sent (the file sink)."""
    import email
    import re

    outbox = Path(get_settings().outbox_dir)
    new = [p for p in outbox.glob("*.eml") if p not in before]
    assert len(new) == 1, new
    from email import policy

    message = email.message_from_bytes(new[0].read_bytes(), policy=policy.default)
    text = next(p for p in message.walk() if p.get_content_type() == "text/plain")
    found = re.findall(rf"{re.escape(web)}/r/[A-Za-z0-9_-]+", text.get_content())
    assert found, text.get_content()
    return found[0]


def outbox_now() -> set[Path]:
    return set(Path(get_settings().outbox_dir).glob("*.eml"))


def engine_runs(minutes: int) -> None:
    """Webhooks delivered and the engine's passes, `minutes` on."""
    from datetime import UTC, datetime, timedelta

    from recovery import clock
    from recovery.engine import scheduler

    clock.set_now(datetime.now(UTC) + timedelta(minutes=minutes))
    try:
        for _ in range(3):
            scheduler.run_pass(get_settings(), sync=True)
    finally:
        clock.set_now(None)


def type_card(driver, number: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "number")
    field.clear()
    field.send_keys(number)
    driver.find_element(By.ID, "exp").send_keys("12 / 34")
    driver.find_element(By.ID, "cvc").send_keys("123")
    field.find_element(By.XPATH, "./ancestor::form//button").click()


def shows(driver, text: str) -> None:
    """Wait for the page a click or a post leads to: it shows `text`."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: text in d.page_source)


def recovered(case_id: int):
    from recovery.db import session_scope
    from recovery.models import RecoveryCase

    with session_scope() as session:
        return session.get(RecoveryCase, case_id)


def test_from_the_email_a_person_saves_a_card_on_checkout_and_the_case_recovers(
    sim, linked_to, browser, screenshots
):
    before = outbox_now()
    case = open_case(sim, linked_to, {"decline_code": "expired_card"})
    browser.get(emailed_link(case, linked_to, before))
    _button(browser, "Use a new card from now on").click()
    _lands_on(browser, f"{sim.url}/hosted/checkout/cs_test_")
    assert "Save a card for future payments" in browser.page_source
    fits(browser, PHONE)
    screenshot(browser, "checkout-phone", screenshots)

    type_card(browser, "4000 0000 0000 0002")  # Stripe's declining test card
    shows(browser, "Your card was declined.")
    type_card(browser, "4242 4242 4242 4242")
    _lands_on(browser, f"{linked_to}/r/card-saved")
    assert "Your new card is saved" in browser.page_source

    sim.flush()
    engine_runs(minutes=10)
    done = recovered(case.id)
    assert (done.status, done.recovery_path) == ("recovered", "card_update")
    paid_with = [c for c in sim.state.objects.values() if c.get("object") == "charge"]
    assert [c["payment_method_details"]["card"]["last4"] for c in paid_with if c["paid"]] == [
        "4242"
    ]


def test_from_the_email_a_person_pays_on_the_invoice_page_after_authenticating(
    sim, linked_to, browser, screenshots
):
    from selenium.webdriver.common.by import By

    before = outbox_now()
    case = open_case(sim, linked_to, {"decline_code": "insufficient_funds"})
    browser.get(emailed_link(case, linked_to, before))
    _button(browser, "Pay $20.00 now").click()
    _lands_on(browser, f"{sim.url}/hosted/invoices/{case.invoice_id}")
    assert "$20.00" in browser.page_source
    fits(browser, PHONE)
    screenshot(browser, "invoice-phone", screenshots)

    type_card(browser, "4000 0025 0000 3155")  # asks the cardholder to authenticate
    shows(browser, "Complete authentication")
    _button(browser, "Fail authentication").click()
    shows(browser, "unable to authenticate")
    assert recovered(case.id).status == "open"
    type_card(browser, "4000 0025 0000 3155")
    shows(browser, "Complete authentication")
    screenshot(browser, "authenticate-phone", screenshots)
    _button(browser, "Complete authentication").click()
    shows(browser, "Invoice paid")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Invoice paid"

    sim.flush()
    engine_runs(minutes=1)
    done = recovered(case.id)
    assert (done.status, done.recovery_path, done.amount_recovered) == ("recovered", "link", 2000)


def test_a_person_pays_in_checkout_in_payment_mode(sim, browser, screenshots):
    import stripe

    client = stripe.StripeClient("sk_test_shop", base_addresses={"api": sim.url})
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "line_items": [{"price_data": {"currency": "eur", "unit_amount": 1250}, "quantity": 2}],
            # Back to Stripe's own page for the session, which then says it is paid.
            "success_url": f"{sim.url}/hosted/checkout/{{CHECKOUT_SESSION_ID}}",
        }
    )
    browser.get(session.url)
    assert "Pay €25.00" in browser.page_source
    fits(browser, PHONE)
    screenshot(browser, "checkout-payment-phone", screenshots)
    type_card(browser, "4000 0000 0000 0341")  # entered, then declined when charged
    shows(browser, "Your card was declined.")
    type_card(browser, "4242 4242 4242 4242")
    shows(browser, "Payment complete")
    assert client.v1.checkout.sessions.retrieve(session.id).payment_status == "paid"
