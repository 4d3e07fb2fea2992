"""A counting SMTP server for benchmarks (aiosmtpd): accepts every message.

    python bench/smtp_sink.py PORT

Prints the number of messages received when its stdin closes.
"""

from __future__ import annotations

import sys

from aiosmtpd.controller import Controller


class Counter:
    received = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook
        Counter.received += 1
        return "250 OK"


if __name__ == "__main__":
    controller = Controller(Counter(), hostname="127.0.0.1", port=int(sys.argv[1]))
    controller.start()
    print("ready", flush=True)
    sys.stdin.read()
    controller.stop()
    print(Counter.received, flush=True)
