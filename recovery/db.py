"""The database: its engine, the one way to open a unit of work, and the
schema's migrations (Alembic, without an alembic.ini)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, Table, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from recovery.config import get_settings
from recovery.paths import shipped

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = shipped("migrations")


def normalise_url(url: str) -> str:
    """A bare postgresql:// URL means psycopg2, the driver this project ships with."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names; None for other databases and in-memory ones."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    name = parsed.database or ""
    if name in ("", ":memory:") or name.startswith("file:"):
        return None
    return Path(name)


CONNECT_TIMEOUT_SECONDS = 2  # libpq's least
TCP_USER_TIMEOUT_MS = 5000


def make_engine(url: str, statement_timeout_ms: int | None = None) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL: a commit is one append and a reader outside a transaction
            # never waits for a writer; the foreign keys pragma makes SQLite
            # enforce what PostgreSQL enforces.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # WAL's recommended pairing: a commit survives the process dying,
            # and only a power cut may lose the last ones; without it every
            # commit waits for an fsync. SQLite is the embedded default, not
            # the production store.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # The driver's own BEGIN comes only before a write, so what a
            # transaction read before it could change under it: SELECT ... FOR
            # UPDATE, which PostgreSQL honours, locks nothing here. As in
            # SQLAlchemy's recipe for SQLite (its dialect docs, "Serializable
            # isolation / Savepoints / Transactional DDL") the transaction
            # begins at once, and IMMEDIATE takes the write lock then: one
            # transaction at a time, so an operator's cancel waits for a charge
            # in flight, as on PostgreSQL, instead of overwriting its result.
            # A connection asked to autocommit (a link's click, one statement)
            # commits each statement itself; a BEGIN would leave it uncommitted.
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # A database that stops answering (a partition, not a refused connection)
    # must fail a request in seconds, not hang it: libpq gives up connecting
    # after CONNECT_TIMEOUT, and the kernel drops a connection whose sent
    # bytes go unacknowledged for TCP_USER_TIMEOUT or whose keepalives go
    # unanswered; the server ends a statement after statement_timeout (a lock
    # wait). Callers on a deadline (the receiver, /readyz) also bound their
    # own wait. No pool_pre_ping: it costs a round trip per request on the
    # receiver's hot path; a connection broken by a restart fails one request
    # (503, Stripe retries) and SQLAlchemy then drops the whole stale pool.
    connect_args: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
    }
    if statement_timeout_ms:
        connect_args["options"] = f"-c statement_timeout={statement_timeout_ms}"
    return create_engine(
        url,
        pool_size=5,
        max_overflow=5,
        pool_timeout=CONNECT_TIMEOUT_SECONDS,
        # An error's message never carries a row's values (card fingerprints,
        # emails) into a log line or a Sentry event.
        hide_parameters=True,
        connect_args=connect_args,
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database_url, settings.database_statement_timeout_ms)


@lru_cache(maxsize=1)
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def reset_engine() -> None:
    """Drop pooled connections: after fork, and when tests change settings."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    _session_factory.cache_clear()


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: committed on success, rolled back on error, always closed."""
    session = _session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dialect_of(conn: Connection | Session) -> str:
    return conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name


def table_of(model: type[DeclarativeBase]) -> Table:
    """A mapped class's table, for Core statements (no ORM bookkeeping per row)."""
    return cast(Table, model.__table__)


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE, DELETE or INSERT changed (a Session types every
    result as a plain Result; a DML statement's is a CursorResult)."""
    if not isinstance(result, CursorResult):
        raise TypeError("rows_changed needs the result of an UPDATE, DELETE or INSERT")
    return result.rowcount


def _insert_of(dialect: str) -> Any:
    """The dialect's INSERT with ON CONFLICT, imported on first use: a
    command on SQLite need not load PostgreSQL's dialect."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def insert_ignore(
    conn: Connection | Session,
    model: type[DeclarativeBase],
    values: dict[str, Any],
    unique: list[str],
) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when this call inserted the row."""
    statement = _insert_of(dialect_of(conn))(table_of(model)).on_conflict_do_nothing(
        index_elements=unique
    )
    return rows_changed(conn.execute(statement, values)) == 1


def insert_ignore_returning(
    conn: Connection, model: type[DeclarativeBase], rows: list[dict[str, Any]], key: str
) -> set[Any]:
    """INSERT … ON CONFLICT DO NOTHING for many rows; the keys actually inserted.

    The rows go as parameters of one cached statement: SQLAlchemy's
    "insertmanyvalues" sends them as multi-row INSERTs without compiling SQL
    per batch, which a `.values(rows)` statement would (a third of the
    receiver's CPU when it did).
    """
    table = table_of(model)
    statement = (
        _insert_of(conn.dialect.name)(table)
        .on_conflict_do_nothing(index_elements=[key])
        .returning(table.c[key])
    )
    return set(conn.execute(statement, rows).scalars())


# -- migrations -----------------------------------------------------------------


# Alembic is imported where migrations run: every command that only reads
# would otherwise wait on it.


def alembic_config(database_url: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    """The migration the database is at; None before the first."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def check(database_url: str | None = None) -> None:
    """Raise alembic.util.exc.AutogenerateDiffsDetected when models and migrations drift."""
    from alembic import command

    command.check(alembic_config(database_url))
