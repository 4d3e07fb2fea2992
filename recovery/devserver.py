"""A threaded WSGI server from the standard library, for the embedded default,
the Stripe simulator and tests. Production serves recovery.web under gunicorn."""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Bursts of concurrent webhooks must queue, not be refused.
    request_queue_size = 128


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        # Request lines would carry link tokens; the app logs what matters.
        pass


def serve(app, host: str, port: int) -> WSGIServer:
    """A bound server; call serve_forever() on it, or start_in_thread()."""
    return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, str]:
    server = serve(app, host, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="wsgi").start()
    return server, f"http://{host}:{server.server_address[1]}"
