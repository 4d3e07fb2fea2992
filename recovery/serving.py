"""How the web app is served: uvicorn's HTTP protocol with limits on the
request head, under gunicorn in production (`Worker`) and alone in process
for the embedded default and tests (`uvicorn_config`).

uvicorn's httptools protocol takes a request head of any size: one 64 MiB
header grows a web worker by hundreds of MiB and holds it for seconds, and ten
thousand headers are handed to the app. Here a head is refused with 431 once
it passes MAX_HEAD_BYTES or MAX_HEADERS, before the app sees it and while it
is still arriving; a request the parser refuses gets a JSON 400, like every
other refusal of the receiver.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from gunicorn import glogging
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from recovery.config import get_settings
from recovery.observability import configure_logging

# A Stripe delivery's head is well under 2 KiB; a browser's with cookies a few
# KiB. gunicorn and nginx draw their lines at 100 headers and 8-32 KiB.
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100
# After a refusal: how long, and how much, is read and dropped before closing.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 128 * 1024 * 1024


class _HeadTooLarge(Exception):
    pass


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol, refusing an oversized request head with 431."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True
        self._head_size = 0  # bytes read while the head is open
        self._parsed_head = 0  # bytes of the head the parser has named
        self._refusal: tuple[int, str] | None = None
        self._drained = 0

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            # Answered: what still arrives is read and dropped (see _refuse).
            self._drained += len(data)
            if self._drained > LINGER_MAX_BYTES:
                self.transport.close()
            return
        if self._head_open:
            # httptools gathers a header's value before naming it to us, so
            # what is still arriving is counted here.
            self._head_size += len(data)
        super().data_received(data)
        if self._head_open and self._head_size > MAX_HEAD_BYTES and self._refusal is None:
            self._refuse(431, "request head too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_size = 0
        self._parsed_head = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if len(self.headers) >= MAX_HEADERS:
            self._refusal = (431, f"more than {MAX_HEADERS} request headers")
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        # Exact sizes once parsed: a head that arrived in one read is caught here.
        self._parsed_head += size
        if self._parsed_head > MAX_HEAD_BYTES:
            self._refusal = (431, "request head too large")
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        # The parser refused the request (or a callback above did): answer in
        # JSON, with the status the refusal asked for.
        status, reason = self._refusal or (400, "malformed HTTP request")
        self._refusal = None
        self._refuse(status, reason)

    def _refuse(self, status: int, reason: str) -> None:
        self._refusal = (status, reason)
        body = json.dumps({"error": reason}).encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        # A lingering close: closed while the client's bytes are still
        # unread, the kernel resets the connection and a client still
        # writing never reads the answer. So the write side is shut, what
        # arrives is read and dropped, and the connection closes after a
        # moment, or once more than a client could honestly send arrived.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)


class Worker(UvicornWorker):
    """gunicorn's worker class for the web app: `-k recovery.serving.Worker`."""

    CONFIG_KWARGS = {"loop": "auto", "http": BoundedHttpProtocol, "access_log": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # UvicornWorker hands uvicorn's loggers gunicorn's handlers; ours
        # is on the root (and uvicorn's access line stays off: see
        # observability.configure_logging).
        configure_logging(get_settings())


class GunicornLogger(glogging.Logger):
    """gunicorn's own records (boot, worker exits) through the process's one
    logging configuration: `--logger-class recovery.serving.GunicornLogger`."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        configure_logging(get_settings())


def uvicorn_config(app: Any) -> uvicorn.Config:
    # No uvicorn access log: the app writes its own line, tokens redacted.
    # log_config=None: uvicorn's own logging config would give its loggers
    # handlers of their own, and an exception in the app would never reach
    # ours (scrubbed, JSON, on to Sentry).
    return uvicorn.Config(
        app,
        access_log=False,
        log_level="warning",
        log_config=None,
        lifespan="on",
        http=BoundedHttpProtocol,
    )
