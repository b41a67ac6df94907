"""The database: engine, migrations, and the two kinds of session every process uses.

Two dialects, one behaviour: the SQLite file under the storage root (the default, one machine) or
PostgreSQL (`database.url`, the distributed mode of docs/scaling.md).

- `transaction(factory)`: one unit of work that writes, serialised against every other writer of
  every process and host. On SQLite it starts with BEGIN IMMEDIATE (SQLAlchemy's documented
  pysqlite recipe); on PostgreSQL it takes the transaction-level advisory lock `WRITE_LOCK`
  (`pg_advisory_xact_lock`, released at commit or rollback). Either way two processes can never
  both read "the latest audit row" or "the next queued job" and both act on it. A thread holds at
  most one: opening a second one inside the first raises `NestedTransactionError` at once instead
  of waiting on itself (issue 10: a job failing at discovery once stalled the whole node that way).
  `transaction(factory, lock=False)` writes without that lock on PostgreSQL: only the receive path's
  instance rows (db/instances.py), which unique indexes and one series row lock keep consistent, so
  receivers commit in parallel; such a unit of work cannot append to the audit chain.
- `with factory() as session:` a read. It takes no write lock (WAL readers / MVCC snapshots never
  block writers) and cannot write: SQLite's connection is `query_only`, PostgreSQL's transaction
  is READ ONLY, so a write slipped into a read fails loudly.

Each process opens the database once (`open_configured`, or `open_database`): migrations run, the
audit head anchor (db/audit.py) is attached, and on SQLite a small disk reserve is kept so that
refusals can still be audited on a full disk (`write_with_reserve`; PostgreSQL's disk is its own).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.audit import LOCKED_KEY

LOG = logging.getLogger("rtprop.db")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
WRITE = "rtprop_write"  # execution option that marks a connection of `transaction()`
LOCKED = "rtprop_locked"  # ... and one that holds the cluster-wide write lock (every one but `transaction(lock=False)`)
RESERVE_MB = 8  # room kept back on the database's disk for the audit rows of refusals
WRITE_LOCK = 0x72747072  # "rtpr": the PostgreSQL advisory lock key every write unit of work takes
CONNECT_TIMEOUT_S = 10  # a database host that does not answer: fail fast (the SCP answers 0xA700)
T = TypeVar("T")


class NestedTransactionError(RuntimeError):
    """A write transaction was opened while this thread already holds one (it would wait on itself)."""


def is_url(location: Path | str) -> bool:
    """A database URL (PostgreSQL) rather than the path of a SQLite file."""
    return isinstance(location, str) and "://" in location


def make_engine(location: Path | str) -> Engine:
    """An engine on the SQLite file at `location` (parent folders created), or on a PostgreSQL URL."""
    if is_url(location):
        return _postgres_engine(str(location))
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # it holds password hashes: the node's user only. Never open an existing file here:
        # closing any descriptor of it drops this process's SQLite locks on it (POSIX), and another process's
        # last connection then deletes the WAL that this one still writes to (its commits lost to the others)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    for own in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        restrict(own)  # made by an earlier release; SQLite gives -wal/-shm the database file's mode
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        if conn.get_execution_options().get(WRITE):
            conn.exec_driver_sql("PRAGMA query_only=0")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("PRAGMA query_only=1")
            conn.exec_driver_sql("BEGIN")

    return engine


def restrict(path: Path, mode: int = 0o600) -> None:
    """Take group and other permissions off a file or folder of the node's own that an earlier release made
    open to them (new ones are made so); logged once when changed."""
    try:
        current = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return
    if current & 0o077:
        os.chmod(path, mode)
        LOG.warning("%s was mode %03o: now %03o (the node's own files are not for other users)", path, current, mode)


def _postgres_engine(url: str) -> Engine:
    """PostgreSQL through psycopg 3: writes serialised by the advisory lock, reads READ ONLY."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"database.url {parsed.render_as_string()}: only PostgreSQL URLs are supported "
                         "(postgresql+psycopg://USER@HOST:PORT/DB); leave it unset for the SQLite file")
    engine = create_engine(parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True, pool_size=5,
                           max_overflow=10, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        options = conn.get_execution_options()
        if options.get(WRITE):
            if options.get(LOCKED):
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")
        else:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


def is_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached (server down, connection lost): retry later, never a verdict."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc).lower()
        return any(s in text for s in ("connection refused", "could not connect", "server closed the connection",
                                       "terminating connection", "connection is closed", "the database system is",
                                       "timeout expired", "connection timeout", "no connection to the server",
                                       "consuming input failed"))
    return False


def log_fault(log: logging.Logger, what: str, exc: BaseException) -> None:
    """A failed pass of a loop, from its `except`: one line while the database is unreachable (it comes
    back by itself and the loop retries), the traceback for anything else."""
    if is_unavailable(exc):
        log.warning("%s: database unavailable, retrying: %s", what, str(exc).strip().splitlines()[0][:200])
    else:
        log.exception("%s failed; retrying", what)


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None: a new, empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe at every start-up)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger("rtprop").getEffectiveLevel()))
    with engine.connect().execution_options(**{WRITE: True, LOCKED: True}) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def open_database(location: Path | str, *, head_path: Path | str | None = None,
                  key_path: Path | str | None = None) -> sessionmaker[Session]:
    """Engine + migrations + the audit head anchor + the site's pseudonym key + the disk reserve: what every
    process calls once.

    `location`: the SQLite file, or a PostgreSQL URL. `head_path`: the audit chain's head anchor
    (default: beside the SQLite file, `<name>.audit-head`; required with a URL: under the shared
    storage root, see `open_configured`). `key_path`: the pseudonym key (db/audit.py), by default
    beside the anchor (`<name>.key`).
    """
    from db import audit

    engine = make_engine(location)
    before = schema_revision(engine)
    migrate(engine)
    if is_url(location):
        if head_path is None:
            raise ValueError("a PostgreSQL database needs the path of its audit head anchor (head_path)")
        head, reserve = Path(head_path), None
    else:
        path = Path(location)
        head = Path(head_path) if head_path is not None else path.with_name(path.name + ".audit-head")
        reserve = path.with_name(path.name + ".reserve")
    key = Path(key_path) if key_path is not None else head.with_name(head.name.removesuffix(".audit-head") + ".key")
    factory = sessionmaker(engine, expire_on_commit=False, info={"audit_head": head, "reserve": reserve})
    audit.attach_head(factory)
    with transaction(factory) as session:
        audit.anchor_upgraded(session, before)
        factory.kw["info"]["pseudonym_key"] = audit.open_site_key(session, key)
    ensure_reserve(factory)
    return factory


POSTGRES_HEAD = "rtprop-postgresql.audit-head"  # the anchor of a PostgreSQL database, under storage.root


def database_location(config) -> Path | str:  # type: ignore[no-untyped-def]
    """What `config` names: `database.url` (PostgreSQL) or the SQLite file `storage.database`."""
    return config.database.url or config.storage.database


def open_configured(config) -> sessionmaker[Session]:  # type: ignore[no-untyped-def]
    """The database of a (storage-resolved) configuration, as every process opens it."""
    key = config.storage.pseudonym_key_file  # None: beside the head anchor
    if config.database.url:
        Path(config.storage.root).mkdir(parents=True, exist_ok=True)  # the anchor's folder, on the shared storage
        factory = open_database(config.database.url, head_path=Path(config.storage.root) / POSTGRES_HEAD,
                                key_path=key)
    else:
        factory = open_database(config.storage.database, key_path=key)
    return factory


_local = threading.local()


@contextmanager
def transaction(factory: sessionmaker[Session], *, lock: bool = True) -> Iterator[Session]:
    """One write-locked unit of work: committed on success, rolled back on any exception.

    `lock=False`: a write that does not take PostgreSQL's cluster-wide advisory lock, for a unit of work
    that is safe by row locks and unique indexes alone (the receive path's instance rows, db/instances.py);
    it cannot append to the audit chain (db/audit.py refuses). SQLite serialises every writer either way.
    """
    if getattr(_local, "open", False):
        raise NestedTransactionError("a database transaction is already open in this thread: finish one unit "
                                     "of work before starting the next (a nested one would wait on itself)")
    _local.open = True
    try:
        with factory() as session, session.begin():
            session.connection(execution_options={WRITE: True, LOCKED: lock})
            session.info[LOCKED_KEY] = lock
            yield session
    finally:
        _local.open = False


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's 'database or disk is full' (SQLITE_FULL), or the OS's ENOSPC/EDQUOT."""
    if isinstance(exc, OperationalError):
        return "disk is full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno in (28, 122)


def ensure_reserve(factory: sessionmaker[Session], size_mb: int = RESERVE_MB) -> bool:
    """Keep `size_mb` of disk beside the database (a preallocated file); False if there is no room yet."""
    if factory.kw["info"]["reserve"] is None:  # PostgreSQL: the server's disk is not ours to reserve
        return True
    reserve = Path(factory.kw["info"]["reserve"])
    try:
        if reserve.exists() and reserve.stat().st_size >= size_mb << 20:
            return True
        with os.fdopen(os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, size_mb << 20)
        return True
    except OSError:
        reserve.unlink(missing_ok=True)
        return False


def write_with_reserve(factory: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """Run `work(session)` in a transaction; on a full disk, give the reserve back and try once more.

    For the few writes that must land even then: the audit of a refused or quarantined instance.
    """
    try:
        with transaction(factory) as session:
            return work(session)
    except Exception as exc:
        if factory.kw["info"]["reserve"] is None:
            raise
        reserve = Path(factory.kw["info"]["reserve"])
        if not is_disk_full(exc) or not reserve.exists():
            raise
        LOG.critical("disk full: releasing the %d MB database reserve to record what happened", RESERVE_MB)
        reserve.unlink(missing_ok=True)
        with transaction(factory) as session:
            return work(session)
