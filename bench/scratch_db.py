"""A throwaway PostgreSQL database, migrated to head, for one benchmark run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2

from recovery.db import upgrade

ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def scratch_database() -> Iterator[str]:
    admin = psycopg2.connect(ADMIN_URL.replace("postgresql://", "postgres://"))
    admin.autocommit = True
    name = f"recovery_bench_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
