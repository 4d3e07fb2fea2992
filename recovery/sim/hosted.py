"""The pages Stripe hosts, as a person meets them in the simulator: Checkout
saving a card (setup mode) or paying (payment mode), the hosted invoice page
paying an invoice, the billing portal replacing a card. Each takes Stripe's
test card numbers and does what Stripe does with them
(https://docs.stripe.com/testing): 4242… is approved, the decline cards are
refused when entered, a card that asks for authentication shows a challenge
with Stripe's two test buttons (complete, fail), and 4000 0000 0000 0341 is
saved but declines every charge. The simulator's server turns a submitted
form into the same calls and webhooks its JSON routes make; this module only
draws the pages and reads the card.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

from recovery.money import format_money


@dataclass(frozen=True)
class TestCard:
    number: str
    brand: str
    label: str
    # Refused when entered (saving or paying): Stripe's decline code.
    declines_at_entry: str | None = None
    # Asks the customer to authenticate whenever they are present.
    authenticates: bool = False
    # How the saved card answers later charges made without the customer.
    later: dict[str, Any] | None = None

    @property
    def last4(self) -> str:
        return self.number[-4:]

    def card(self) -> dict[str, Any]:
        """The simulator's card for it, as its JSON routes take one."""
        return {
            "brand": self.brand,
            "last4": self.last4,
            "exp_month": 12,
            "exp_year": 2034,
            "behavior": self.later or {"mode": "succeed"},
        }


TEST_CARDS = {
    card.number: card
    for card in (
        TestCard("4242424242424242", "visa", "approved"),
        TestCard("5555555555554444", "mastercard", "approved"),
        TestCard("4000000000000002", "visa", "declined", declines_at_entry="generic_decline"),
        TestCard(
            "4000000000009995", "visa", "insufficient funds", declines_at_entry="insufficient_funds"
        ),
        TestCard("4000000000000069", "visa", "expired", declines_at_entry="expired_card"),
        # Set up for later payments, its off-session charges go through.
        TestCard("4000002500003155", "visa", "authenticates when present", authenticates=True),
        TestCard(
            "4000002760003184",
            "visa",
            "always authenticates",
            authenticates=True,
            later={"mode": "authenticate"},
        ),
        TestCard(
            "4000000000000341",
            "visa",
            "saved, then declines",
            later={"mode": "decline", "decline_code": "generic_decline"},
        ),
    )
}

DECLINE_MESSAGES = {
    "generic_decline": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
}


def decline_message(decline_code: str | None) -> str:
    """What Stripe's page says for a declined card."""
    return DECLINE_MESSAGES.get(decline_code or "", DECLINE_MESSAGES["generic_decline"])


class CardRefused(Exception):
    """What the page says under the card form."""


def read_card(number: str) -> TestCard:
    digits = "".join(ch for ch in number if ch.isdigit())
    if not digits:
        raise CardRefused("Enter a card number.")
    found = TEST_CARDS.get(digits)
    if found is None:
        raise CardRefused(
            "Your card number is not one of Stripe's test cards; this is test mode."
            " Try 4242 4242 4242 4242."
        )
    if found.declines_at_entry:
        raise CardRefused(decline_message(found.declines_at_entry))
    return found


_STYLE = """
body{margin:0;background:#f6f9fc;color:#1a1f36;font:16px/1.5 -apple-system,"Segoe UI",Roboto,
Helvetica,Arial,sans-serif}
main{max-width:440px;margin:0 auto;padding:24px 16px}
.mode{background:#ffde92;color:#663c00;font-size:13px;text-align:center;padding:4px}
.box{background:#fff;border-radius:8px;padding:24px;box-shadow:0 1px 3px rgba(0,0,0,.1)}
h1{font-size:22px;margin:0 0 8px}.amount{font-size:32px;font-weight:600;margin:4px 0 16px}
label{display:block;font-size:14px;margin:12px 0 4px;color:#3c4257}
input{width:100%;box-sizing:border-box;font:inherit;padding:10px;border:1px solid #c1c9d2;
border-radius:6px}
button{width:100%;margin-top:16px;padding:12px;font:inherit;font-weight:600;color:#fff;
background:#635bff;border:0;border-radius:6px;cursor:pointer}
button.secondary{background:#fff;color:#635bff;border:1px solid #635bff}
.error{color:#df1b41;margin:12px 0 0}.note{color:#697386;font-size:14px}
details{margin-top:20px;font-size:14px;color:#697386}code{font-size:13px}
"""


def page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        '<div class="mode">Test mode: the Stripe-compatible simulator</div>'
        f'<main><div class="box">{body}</div></main></body></html>'
    )


def _test_cards() -> str:
    rows = "".join(
        f"<li><code>{' '.join(c.number[i : i + 4] for i in range(0, 16, 4))}</code>"
        f" {escape(c.label)}</li>"
        for c in TEST_CARDS.values()
    )
    return f"<details><summary>Test cards</summary><ul>{rows}</ul></details>"


def _hidden(fields: dict[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items()
    )


def card_form(action_label: str, error: str | None, hidden: dict[str, str] | None = None) -> str:
    fields = _hidden(hidden or {})
    shown_error = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return (
        f'<form method="post">{fields}'
        '<label for="number">Card number</label>'
        '<input id="number" name="number" inputmode="numeric" autocomplete="cc-number"'
        ' placeholder="1234 1234 1234 1234">'
        '<label for="exp">Expiry</label>'
        '<input id="exp" name="exp" placeholder="MM / YY" autocomplete="cc-exp">'
        '<label for="cvc">CVC</label><input id="cvc" name="cvc" placeholder="CVC">'
        f"{shown_error}<button>{escape(action_label)}</button></form>{_test_cards()}"
    )


def challenge(number: str, extra: dict[str, str]) -> str:
    """Stripe's test authentication page: the bank asks, the tester answers."""
    hidden = _hidden({"number": number, **extra})
    return page(
        "Authenticate your card",
        "<h1>Your bank asks you to confirm</h1>"
        '<p class="note">A test authentication: choose what the cardholder does.</p>'
        f'<form method="post">{hidden}<input type="hidden" name="authenticate" value="complete">'
        "<button>Complete authentication</button></form>"
        f'<form method="post">{hidden}<input type="hidden" name="authenticate" value="fail">'
        '<button class="secondary">Fail authentication</button></form>',
    )


def checkout_page(session: dict, error: str | None = None) -> str:
    paying = session["mode"] == "payment"
    if session["status"] != "open":
        if paying and session.get("payment_status") == "paid":
            return page("Paid", "<h1>Payment complete</h1><p>Thank you.</p>")
        return page("Checkout", "<h1>This page has expired</h1><p>Nothing was saved.</p>")
    back = session.get("cancel_url")
    cancel = f'<p class="note"><a href="{escape(back)}">← Back</a></p>' if back else ""
    if paying:
        amount = format_money(session["amount_total"], session["currency"], "en_US")
        return page(
            "Pay",
            f'{cancel}<h1>Pay</h1><p class="amount">{escape(amount)}</p>'
            + card_form(f"Pay {amount}", error),
        )
    return page(
        "Save a card",
        f"{cancel}<h1>Save a card for future payments</h1>"
        '<p class="note">Your card will be charged for this subscription from now on.</p>'
        + card_form("Save card", error),
    )


def invoice_page(invoice: dict, on_file: dict | None, error: str | None = None) -> str:
    amount = format_money(invoice["amount_due"], invoice["currency"], "en_US")
    if invoice["status"] == "paid":
        return page(
            "Invoice paid",
            f'<h1>Invoice paid</h1><p class="amount">{escape(amount)}</p>'
            '<p class="note">Thank you. A receipt is on its way.</p>',
        )
    if invoice["status"] != "open":
        return page("Invoice", f"<h1>This invoice is {escape(invoice['status'])}</h1>")
    pay_on_file = ""
    if on_file is not None:
        card = on_file["card"]
        pay_on_file = (
            '<form method="post"><input type="hidden" name="use" value="on_file">'
            f"<button>Pay {escape(amount)} with {escape(card['brand'].title())}"
            f" •••• {escape(card['last4'])}</button></form>"
            '<p class="note">Or with another card:</p>'
        )
    return page(
        "Pay your invoice",
        f"<h1>Invoice {escape(invoice.get('number') or invoice['id'])}</h1>"
        f'<p class="amount">{escape(amount)}</p>{pay_on_file}' + card_form(f"Pay {amount}", error),
    )


def portal_page(
    session: dict, cards: list[dict], default: str | None, saved: bool, error: str | None = None
) -> str:
    listed = "".join(
        f"<li>{escape(pm['card']['brand'].title())} •••• {escape(pm['card']['last4'])}"
        f"{' (default)' if pm['id'] == default else ''}</li>"
        for pm in cards
    )
    back = session.get("return_url")
    done = (
        '<p class="note">Your new card is the default for your subscription.</p>' if saved else ""
    )
    home = f'<p><a href="{escape(back)}">Return</a></p>' if back else ""
    return page(
        "Billing",
        f"<h1>Payment methods</h1><ul>{listed}</ul>{done}<h2>Add a card</h2>"
        + card_form("Add card", error)
        + home,
    )


@dataclass
class Html:
    """An HTML answer (or a redirect) from the simulator's hosted pages."""

    body: str = ""
    status: int = 200
    location: str | None = None
