"""Getting an email out: SMTP from configuration, or .eml files for the
embedded default. Errors come back sorted into transient (retry later) and
permanent (record it for an operator)."""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import smtplib
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from email.header import Header
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from recovery.config import Settings
from recovery.customers.emails import Rendered

_ADDRESS = re.compile(r"[^\s<>@]+@[^\s<>@]+")


class SendFailed(Exception):
    """The email was not accepted. `permanent`: trying again will not help.
    `in_doubt`: the server may have taken it (the connection was lost after
    the message was sent, before the server's answer)."""

    def __init__(self, reason: str, permanent: bool, in_doubt: bool = False):
        # SMTP replies often quote the recipient; keep addresses out of the
        # record, the logs and Sentry.
        super().__init__(_ADDRESS.sub("<address>", reason)[:300])
        self.permanent = permanent
        self.in_doubt = in_doubt


@dataclass(frozen=True)
class Outgoing:
    """An email ready for the wire: envelope, identity and the flattened bytes.
    `smtputf8`: the address is not ASCII, so the server must offer SMTPUTF8."""

    sender: str
    recipient: str
    message_id: str
    data: bytes
    smtputf8: bool = False


def build(
    rendered: Rendered,
    to: str,
    settings: Settings,
    opt_out_url: str | None = None,
    subject_prefix: str = "",
    message_id: str | None = None,
) -> Outgoing:
    """The email as bytes; `message_id` to send again one that may have arrived
    (the same Message-ID lets mail systems drop the copy)."""
    # Written out by hand: the email package's generator took a third of the
    # time of a send; this is the same multipart/alternative, and the tests
    # read it back with the email package.
    name, sender = parseaddr(settings.email_from)
    domain = sender.rsplit("@", 1)[-1] or None
    message_id = message_id or make_msgid(domain=domain)
    subject = subject_prefix + rendered.subject
    boundary = f"=_{secrets.token_hex(16)}"
    headers = [
        f"From: {formataddr((name, sender), charset='utf-8')}",
        f"To: {to}",
        f"Subject: {_header(subject)}",
        f"Date: {formatdate(localtime=False, usegmt=True)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-generated",
    ]
    if opt_out_url:
        # RFC 8058 one-click unsubscribe: mail clients POST to the address.
        headers += [
            f"List-Unsubscribe: <{opt_out_url}>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        ]
    headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    lines = [*headers, ""]
    for subtype, body in (("plain", rendered.text), ("html", rendered.html)):
        lines += [
            f"--{boundary}",
            f'Content-Type: text/{subtype}; charset="utf-8"',
            "Content-Transfer-Encoding: base64",
            "",
            base64.encodebytes(body.encode()).decode("ascii").replace("\n", "\r\n"),
        ]
    lines += [f"--{boundary}--", ""]
    # An internationalized address goes in the headers as UTF-8 (RFC 6532),
    # which only a server offering SMTPUTF8 (RFC 6531) takes.
    smtputf8 = not to.isascii()
    data = "\r\n".join(lines).encode("utf-8" if smtputf8 else "ascii")
    return Outgoing(sender, to, message_id, data, smtputf8)


def _header(value: str) -> str:
    """A header value as RFC 2047 words when it is not plain ASCII."""
    return value if value.isascii() else Header(value, "utf-8").encode()


class Transport(Protocol):
    """Where emails go: SMTP, or files. `send` raises SendFailed."""

    def send(self, message: Outgoing) -> None: ...


class FileOutbox:
    """Writes each email as an .eml file: the embedded default sends nothing."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def name_for(message_id: str) -> str:
        """The part of a file's name that says which email it holds."""
        return re.sub(r"[^A-Za-z0-9.-]", "_", message_id.strip("<>"))

    def written(self, message_id: str) -> list[Path]:
        """The files holding the email with this Message-ID."""
        return sorted(self.directory.glob(f"*-{self.name_for(message_id)}.eml"))

    def send(self, message: Outgoing) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{time.time_ns()}-{self.name_for(message.message_id)}.eml"
        partial = final.with_suffix(".eml.part")
        partial.write_bytes(message.data)
        partial.rename(final)  # a reader never sees half a file


class SmtpTransport:
    """A small pool of SMTP connections, reused across emails and threads and
    reopened when the server drops one."""

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.timeout = timeout
        self._idle: list[smtplib.SMTP] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._idle)

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        if not s.smtp_host:
            raise SendFailed("no SMTP_HOST configured", permanent=False)
        conn: smtplib.SMTP
        if s.smtp_security == "tls":
            conn = smtplib.SMTP_SSL(
                s.smtp_host, s.smtp_port, timeout=self.timeout, context=ssl.create_default_context()
            )
        else:
            conn = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=self.timeout)
            if s.smtp_security == "starttls":
                conn.starttls(context=ssl.create_default_context())
        if s.smtp_username:
            conn.login(s.smtp_username, s.smtp_password or "")
        return conn

    def _take(self) -> smtplib.SMTP:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give_back(self, conn: smtplib.SMTP) -> None:
        with self._lock:
            self._idle.append(conn)

    def send(self, message: Outgoing) -> None:
        for attempt in (1, 2):
            try:
                conn = self._take()
            except (smtplib.SMTPException, OSError) as exc:
                raise SendFailed(f"cannot connect: {type(exc).__name__}", permanent=False) from None
            try:
                self._envelope(conn, message)
            except smtplib.SMTPServerDisconnected as exc:
                # Before the message was sent: nothing left us. A pooled
                # connection may have timed out; try a fresh one.
                _close(conn)
                if attempt == 2:
                    raise SendFailed(f"server disconnected: {exc}", permanent=False) from None
                continue
            except SendFailed:
                self._reset(conn)
                raise
            except (smtplib.SMTPException, OSError) as exc:
                _close(conn)
                raise SendFailed(f"{type(exc).__name__}: {exc}", permanent=False) from None
            self._data(conn, message)
            self._give_back(conn)
            return

    @staticmethod
    def _envelope(conn: smtplib.SMTP, message: Outgoing) -> None:
        """MAIL FROM and RCPT TO, refused replies as SendFailed."""
        conn.ehlo_or_helo_if_needed()
        options = []
        if message.smtputf8:
            if not conn.has_extn("smtputf8"):
                raise SendFailed(
                    "the mail server does not offer SMTPUTF8, which this address needs",
                    permanent=True,
                )
            options = ["SMTPUTF8", "BODY=8BITMIME"]
        code, reply = conn.mail(message.sender, options)
        if code != 250:
            raise SendFailed(f"sender refused: {code} {_text(reply)}", permanent=code >= 500)
        code, reply = conn.rcpt(message.recipient)
        if code not in (250, 251):
            raise SendFailed(f"recipient refused: {code} {_text(reply)}", permanent=code >= 500)

    def _data(self, conn: smtplib.SMTP, message: Outgoing) -> None:
        """DATA: a reply refused it, or the connection was lost waiting for the
        reply, when the server may already have taken it."""
        try:
            code, reply = conn.data(message.data)
            if code != 250:  # data() raises only for a refused DATA command itself
                raise smtplib.SMTPDataError(code, reply)
        except smtplib.SMTPResponseException as exc:
            self._reset(conn)
            code = exc.smtp_code
            raise SendFailed(f"{code} {_text(exc.smtp_error)}", permanent=code >= 500) from None
        except (smtplib.SMTPException, OSError) as exc:
            _close(conn)
            raise SendFailed(
                f"in doubt: connection lost after the message was sent ({type(exc).__name__})",
                permanent=False,
                in_doubt=True,
            ) from None

    def _reset(self, conn: smtplib.SMTP) -> None:
        try:
            conn.rset()
        except (smtplib.SMTPException, OSError):
            _close(conn)
            return
        self._give_back(conn)


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _close(conn: smtplib.SMTP) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):
        conn.quit()
    conn.close()


def _close_all(idle: list[smtplib.SMTP]) -> None:
    while idle:
        _close(idle.pop())


@lru_cache(maxsize=4)
def transport_for(settings: Settings) -> Transport:
    """One transport per settings, so a worker keeps its SMTP connections."""
    if settings.smtp_host:
        return SmtpTransport(settings)
    return FileOutbox(settings.outbox_dir)
