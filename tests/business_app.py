"""The business's side of outbound webhooks: an HTTP receiver that verifies
every delivery with the `standardwebhooks` library, as a business would, and
answers as a test tells it (fail N times, hang, 410)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    type: str
    data: dict[str, Any]
    verified_by: list[str]  # which of the app's secrets verified it
    headers: dict[str, str]
    at: float


@dataclass
class BusinessApp:
    """Answers `statuses` in turn (then 200), sleeps `hang` seconds per request."""

    secrets: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    hang: float = 0.0
    attempts: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def accepted(self) -> dict[str, Received]:
        """Each event the app took (answered 2xx), once, by webhook-id."""
        with self.lock:
            return {r.webhook_id: r for r in self.attempts if r.headers.get("x-answered") == "200"}

    def types(self) -> list[str]:
        return [r.type for r in self.accepted().values()]


def start(app: BusinessApp) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified = []
            for secret in app.secrets:
                try:
                    Webhook(secret).verify(body, headers)
                    verified.append(secret)
                except WebhookVerificationError:
                    pass
            if app.hang:
                time.sleep(app.hang)
            with app.lock:
                status = app.statuses.pop(0) if app.statuses else 200
                if not verified:
                    status = 401
                parsed = json.loads(body)
                headers["x-answered"] = str(status)
                app.attempts.append(
                    Received(
                        headers.get("webhook-id", ""),
                        parsed.get("type", ""),
                        parsed.get("data", {}),
                        verified,
                        headers,
                        time.monotonic(),
                    )
                )
            try:
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass  # the sender gave up waiting

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    return server
