"""Group commit for the receiver: many concurrent requests, one INSERT and one
COMMIT per batch.

A commit costs a WAL flush; paying it per webhook caps a receiver at a few
thousand events/s however fast the rest is. Request threads hand their row to
one writer thread per process and wait; the writer inserts whatever arrived
while the previous batch was committing (no timer, so no added latency when
idle) and wakes each request with its own result only after the COMMIT, so a
2xx still means the event is durable.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future

from sqlalchemy import Engine

from recovery.db import insert_ignore_returning
from recovery.models import WebhookEvent

MAX_BATCH = 200
WAIT_SECONDS = 10


class InboxWriter:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queue: queue.SimpleQueue[tuple[dict, Future]] = queue.SimpleQueue()
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        # Started lazily and per process: a thread does not survive fork.
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, daemon=True, name="inbox-writer").start()
                self._pid = os.getpid()

    def store(self, row: dict) -> bool:
        """Insert one inbox row; True if new, False if already stored. Raises DB errors."""
        self._ensure_thread()
        future: Future = Future()
        self._queue.put((row, future))
        return future.result(timeout=WAIT_SECONDS)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[dict, Future]]) -> None:
        try:
            with self.engine.begin() as conn:
                inserted = insert_ignore_returning(
                    conn, WebhookEvent.__table__, [row for row, _ in batch], "stripe_event_id"
                )
        except Exception as exc:  # noqa: BLE001 - every waiting request answers 503
            for _, future in batch:
                future.set_exception(exc)
            return
        for row, future in batch:
            # The same event twice in one batch: only the first is "new".
            key = row["stripe_event_id"]
            future.set_result(key in inserted)
            inserted.discard(key)
