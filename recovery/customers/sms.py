"""Where an SMS goes: Twilio (its SDK, pointed at TWILIO_API_BASE when set,
as the Stripe SDK is at STRIPE_API_BASE), or .txt files in SMS_DIR for the
embedded default. Each transport can also say whether a message to a number
went out since a moment: what settles one left in doubt by a crash."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from recovery.config import Settings

# The GSM 03.38 default alphabet and its extension table: an SMS written in
# them holds 160 characters (the extension's take two); any other character
# makes it UCS-2, 70 characters.
GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€")
E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def fits_one_sms(body: str) -> bool:
    """Whether `body` is one SMS: GSM-7 within 160, or UCS-2 within 70."""
    if all(c in GSM7 or c in GSM7_EXTENDED for c in body):
        return len(body) + sum(1 for c in body if c in GSM7_EXTENDED) <= 160
    return len(body.encode("utf-16-le")) // 2 <= 70


class SendFailed(Exception):
    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Transport(Protocol):
    def send(self, to: str, body: str, status_callback: str | None) -> str:
        """Hand the SMS over; the provider's id for it."""

    def sent_since(self, to: str, since: datetime, body: str) -> str | None:
        """The id of a message with this body to `to` since `since`, if any."""


@dataclass
class TwilioTransport:
    settings: Settings

    def _client(self) -> Any:
        from twilio.rest import Client

        client = Client(self.settings.twilio_account_sid, self.settings.twilio_auth_token)
        if self.settings.twilio_api_base:
            client.api.base_url = self.settings.twilio_api_base.rstrip("/")
        return client

    def _sender(self) -> dict[str, str]:
        sender = self.settings.twilio_from or ""
        return {"messaging_service_sid": sender} if sender.startswith("MG") else {"from_": sender}

    def send(self, to: str, body: str, status_callback: str | None) -> str:
        from twilio.base.exceptions import TwilioException, TwilioRestException

        try:
            message = self._client().messages.create(
                to=to, body=body, status_callback=status_callback, **self._sender()
            )
        except TwilioRestException as exc:
            # 4xx: this message will never be taken (a bad number, a blocked
            # one); anything else may pass later.
            permanent = 400 <= (exc.status or 0) < 500 and exc.status != 429
            raise SendFailed(f"Twilio {exc.status} {exc.code}", permanent) from None
        except (TwilioException, OSError) as exc:
            raise SendFailed(f"Twilio unreachable: {type(exc).__name__}", False) from None
        return str(message.sid)

    def sent_since(self, to: str, since: datetime, body: str) -> str | None:
        for message in self._client().messages.list(to=to, date_sent_after=since, limit=50):
            if message.body == body:
                return str(message.sid)
        return None


@dataclass
class FileSink:
    """One .txt per SMS in SMS_DIR: the demo's and a developer's phone."""

    directory: Path

    def send(self, to: str, body: str, status_callback: str | None) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        number = len(list(self.directory.glob("*.txt"))) + 1
        sid = f"file-{number:06d}"
        path = self.directory / f"{sid}.txt"
        path.write_text(json.dumps({"to": to, "body": body}, ensure_ascii=False) + "\n")
        return sid

    def sent_since(self, to: str, since: datetime, body: str) -> str | None:
        for path in sorted(self.directory.glob("*.txt")):
            if path.stat().st_mtime < since.timestamp():
                continue
            sent = json.loads(path.read_text())
            if sent == {"to": to, "body": body}:
                return path.stem
        return None


def transport(settings: Settings) -> Transport:
    if settings.twilio_account_sid:
        return TwilioTransport(settings)
    return FileSink(Path(settings.sms_dir))
