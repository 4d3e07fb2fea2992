"""A Twilio-compatible server for tests, the demo and development: the
Messages resource of the 2010-04-01 API (create, list by recipient and date
sent), HTTP Basic auth by account SID and auth token, Twilio's error bodies,
and status callbacks and inbound messages signed as Twilio signs them
(X-Twilio-Signature, with the SDK's own RequestValidator).

Point TWILIO_API_BASE at it, as STRIPE_API_BASE points at the Stripe one.
Status callbacks (sent, then delivered) go out on `flush()`.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twilio.request_validator import RequestValidator

from recovery.customers.sms import E164, fits_one_sms

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "twilio_sim_auth_token_0123456789"  # noqa: S105 - the simulator's own


@dataclass
class TwilioState:
    messages: list[dict[str, Any]] = field(default_factory=list)
    callbacks: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # Answers to give the next creates instead of taking them: (status, code).
    refuse: list[tuple[int, int]] = field(default_factory=list)


class TwilioSim:
    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str = AUTH_TOKEN) -> None:
        self.account_sid, self.auth_token = account_sid, auth_token
        self.state = TwilioState()
        self.lock = threading.Lock()

    # -- what a test or the demo drives ------------------------------------------------

    def signed_post(self, url: str, params: dict[str, str]) -> tuple[int, str]:
        """POST a form to `url` signed as Twilio signs its webhooks."""
        signature = RequestValidator(self.auth_token).compute_signature(url, params)
        request = urllib.request.Request(
            url,
            data=urllib.parse.urlencode(params).encode(),
            headers={
                "X-Twilio-Signature": signature,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - a test's URL
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    def reply(self, url: str, from_: str, body: str, to: str = "+15005550006") -> tuple[int, str]:
        """A customer answers our number (STOP, HELP…)."""
        return self.signed_post(
            url,
            {
                "MessageSid": "SM" + secrets.token_hex(16),
                "AccountSid": self.account_sid,
                "From": from_,
                "To": to,
                "Body": body,
                "NumMedia": "0",
            },
        )

    def flush(self) -> int:
        """Send the status callbacks due; how many were taken."""
        with self.lock:
            due, self.state.callbacks = self.state.callbacks, []
        return sum(1 for url, params in due if self.signed_post(url, params)[0] < 300)

    def sent_to(self, number: str) -> list[dict[str, Any]]:
        return [m for m in self.state.messages if m["to"] == number]

    # -- the API -----------------------------------------------------------------------

    def wsgi(self, environ: dict, start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        status, answer = self.handle(
            method, path, environ.get("HTTP_AUTHORIZATION", ""), body, query
        )
        data = json.dumps(answer).encode()
        start_response(
            f"{status} {'OK' if status < 400 else 'Error'}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def handle(
        self, method: str, path: str, auth: str, body: bytes, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        expected = (
            "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        )
        if auth != expected:
            return _error(401, 20003, "Authenticate")
        collection = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        if path != collection:
            return _error(404, 20404, f"The requested resource {path} was not found")
        if method == "GET":
            return 200, self._list(query)
        if method != "POST":
            return _error(405, 20004, "Method not allowed")
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
        return self._create(form)

    def _create(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        to, text = form.get("To", ""), form.get("Body", "")
        sender = form.get("From") or form.get("MessagingServiceSid")
        if not E164.fullmatch(to):
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not sender:
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        if not text:
            return _error(400, 21602, "Message body is required.")
        with self.lock:
            if self.state.refuse:
                status, code = self.state.refuse.pop(0)
                return _error(status, code, "refused by the simulator")
            now = datetime.now(UTC)
            sid = "SM" + secrets.token_hex(16)
            message = {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": text,
                "status": "queued",
                "num_segments": "1" if fits_one_sms(text) else "2",
                "num_media": "0",
                "direction": "outbound-api",
                "api_version": "2010-04-01",
                "date_created": format_datetime(now),
                "date_updated": format_datetime(now),
                "date_sent": format_datetime(now),
                "price": None,
                "price_unit": "USD",
                "error_code": None,
                "error_message": None,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
                "subresource_uris": {
                    "media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
                },
            }
            self.state.messages.append(message)
            callback = form.get("StatusCallback")
            if callback:
                for reached in ("sent", "delivered"):
                    self.state.callbacks.append(
                        (
                            callback,
                            {
                                "MessageSid": sid,
                                "SmsSid": sid,
                                "AccountSid": self.account_sid,
                                "MessageStatus": reached,
                                "SmsStatus": reached,
                                "To": to,
                                "From": form.get("From") or "",
                                "ApiVersion": "2010-04-01",
                            },
                        )
                    )
        return 201, message

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        to = next(iter(query.get("To") or []), None)
        after = next(iter(query.get("DateSent>") or []), None)
        since = _parse(after) if after else None
        with self.lock:
            found = [
                m
                for m in reversed(self.state.messages)
                if (to is None or m["to"] == to)
                and (since is None or _rfc2822(m["date_sent"]) >= since)
            ]
        return {
            "messages": found[:50],
            "page": 0,
            "page_size": 50,
            "first_page_uri": "",
            "next_page_uri": None,
            "previous_page_uri": None,
            "uri": "",
            "start": 0,
            "end": len(found[:50]),
        }


def _error(status: int, code: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _parse(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _rfc2822(value: str) -> datetime:
    from email.utils import parsedate_to_datetime

    return parsedate_to_datetime(value)
