"""In-process servers for the embedded default, the Stripe simulator and tests.

Production serves recovery.web under gunicorn with the uvicorn worker; here the
same app runs on uvicorn directly, and the simulator (plain WSGI) on the
standard library's threaded server.
"""

from __future__ import annotations

import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import uvicorn

from recovery.serving import uvicorn_config


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Bursts of concurrent webhooks must queue, not be refused.
    request_queue_size = 128


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        # Request lines would carry link tokens; the app logs what matters.
        pass


def serve_wsgi(app, host: str, port: int) -> WSGIServer:
    """A bound WSGI server; call serve_forever() on it."""
    return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)


def asgi_server(app) -> uvicorn.Server:
    return uvicorn.Server(uvicorn_config(app))


def serve_asgi(app, host: str, port: int) -> None:
    server = asgi_server(app)
    server.config.host, server.config.port = host, port
    server.run()


class Running:
    """A server started in a daemon thread: its base URL and how to stop it."""

    def __init__(self, url: str, stop):
        self.url = url
        self._stop = stop

    def stop(self) -> None:
        self._stop()


def start_wsgi_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Running:
    server = serve_wsgi(app, host, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="wsgi").start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return Running(f"http://{host}:{server.server_address[1]}", stop)


def start_asgi_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Running:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = asgi_server(app)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="asgi"
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return Running(f"http://{host}:{sock.getsockname()[1]}", stop)
