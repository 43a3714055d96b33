"""The study database: which URL, opened how.

The Optuna study database (any SQLAlchemy URL) is the single source of truth for every engine.
This module resolves which URL to use, opens it with heartbeats so that a dead worker's trial is
found stale and retried, and keeps passwords out of everything printed or stored. It never
imports Keras.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from autofinetune.spec import DEFAULT_STORAGE, StudySpec
from autofinetune.errors import ConfigError
from autofinetune.store.optuna_internals import storage_engine
from autofinetune.store.retries import RetryStaleTrial
from autofinetune.store.outages import OutagePolicy, OutageTolerantStorage, StorageUnavailableError, call_through, is_transient

STORAGE_ENV = "AUTOFINETUNE_STORAGE"
#: Optuna's own variable (its CLI reads it), honoured after ours.
OPTUNA_STORAGE_ENV = "OPTUNA_STORAGE"

def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to print or store."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # not a SQLAlchemy URL: redact the userinfo part by hand
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:
            userinfo, at, host = rest.rpartition("@")
            user = userinfo.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url
        return url
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def resolve_storage_url(flag: str | None, spec: StudySpec | None = None) -> str:
    """``--storage``, then ``$AUTOFINETUNE_STORAGE``, then ``$OPTUNA_STORAGE``, then the spec's
    ``storage``, then SQLite.

    ``$OPTUNA_STORAGE`` is what Optuna's CLI reads; a shell set up for it works here unchanged,
    and ``$AUTOFINETUNE_STORAGE`` still picks another database for autofinetune alone.
    Relative SQLite paths are made absolute against the working directory, so every worker
    process opens the same file.
    """
    url = (
        flag
        or os.environ.get(STORAGE_ENV)
        or os.environ.get(OPTUNA_STORAGE_ENV)
        or (spec.storage if spec else None)
        or DEFAULT_STORAGE
    )
    return _absolute_sqlite(url)


def _absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        path = url[len(prefix) :]
        return prefix + str(Path(path).resolve())
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, else ``None``."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url:
        return Path(url[len(prefix) :])
    return None


@contextmanager
def claim_lock(url: str, *, storage=None, study_name: str = "") -> Iterator[None]:
    """Hold while a worker claims its next trial: fails stale trials, reads the budget, reserves.

    Without it, workers that read the budget at the same moment each start a trial beyond it
    (on PostgreSQL, up to one per worker: 15 extra at 64 workers), and on SQLite, which
    ignores ``SELECT ... FOR UPDATE``, two workers can pop the same WAITING trial (the
    enqueued baseline or a retry) and both run it, or fail one stale trial twice. SQLite's
    workers share a machine, so a lock file beside the database keeps them apart; PostgreSQL's
    workers take a transaction-level advisory lock named after the study, which the server
    releases when a worker's connection dies. Other servers rely on their row locks alone.

    Args:
        url: The study database's URL.
        storage: The worker's ``RDBStorage``; its engine holds the PostgreSQL lock's connection.
        study_name: Workers of different studies on one server do not wait for each other.
    """
    path = sqlite_path(url)
    if path is not None:
        # filelock: flock on POSIX, msvcrt on Windows; waits as long as another worker claims.
        with FileLock(path.with_name(path.name + ".claim.lock")):
            yield
        return
    if storage is None or not url.startswith("postgresql"):
        yield
        return
    from sqlalchemy import text

    key = advisory_lock_key(f"autofinetune claim {study_name}")
    # A transaction-level lock: released when the transaction ends, also by a dead worker's
    # aborted connection, and it works behind PgBouncer in transaction mode, which keeps the
    # transaction on one server connection while the claim's other queries use others.
    def lock():
        connection = storage_engine(storage).connect()
        try:
            transaction = connection.begin()
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        except BaseException:
            connection.close()
            raise
        return connection, transaction

    connection, transaction = call_through(storage, lock, what="taking the claim lock")
    try:
        yield
    finally:
        try:
            transaction.commit()
            connection.close()
        except Exception as error:
            # The server went away while the lock was held: the lock went with the connection.
            if not is_transient(error):
                raise


def advisory_lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for a name, the same in every process."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int = 2,
    create: bool = True,
    connect_retry_seconds: float = 60.0,
    outage: OutagePolicy | None = None,
    wait_to_connect: bool = False,
):
    """Open the study database.

    Args:
        url: A SQLAlchemy URL.
        heartbeat_interval: Seconds between a running trial's heartbeats; ``None`` disables them.
        grace_period: Seconds without a heartbeat after which a running trial is stale.
        max_retry: How many times a stale trial is retried (as a new WAITING trial).
        create: Create the tables when missing (only ``launch`` does; a worker joins).
        connect_retry_seconds: How long a connection to a database server that is full (``too
            many clients``) or restarting is retried before giving up (default 60 s).
        outage: Every call of the storage waits out an outage under this policy (a process that
            runs a search); ``None``: a call fails at once (a command that reads a study).
        wait_to_connect: With ``outage``, wait out an outage while connecting too (a worker
            joining a study that exists); else an unreachable server is refused at once, so
            that a mistyped address is reported rather than waited for.

    Raises:
        ConfigError: the URL is malformed, its driver is missing, or the server is unreachable.
        StorageUnavailableError: ``wait_to_connect`` and the server stayed unreachable past the
            outage grace.
    """
    import optuna

    check_storage_url(url)
    safe = redact_url(url)
    parsed = _parsed_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.is_dir():
            raise ConfigError(f"storage: the folder of {safe!r} does not exist")
        _enable_sqlite_wal(path)
        # Several local workers share one file: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
        engine_kwargs.update(server_pool_options(url, connect_retry_seconds=connect_retry_seconds))
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval:
        # Heartbeats are marked experimental in Optuna; we rely on them on purpose.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period or 3 * heartbeat_interval,
            "heartbeat_stale_trial_callback": RetryStaleTrial(max_retry=max_retry),
        }
    try:
        if outage is None:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create, **heartbeat)
        else:
            storage = OutageTolerantStorage(
                url, outage=outage, wait_to_connect=wait_to_connect, engine_kwargs=engine_kwargs,
                skip_table_creation=not create, **heartbeat,
            )
        storage.get_all_studies()  # fail here, before any work, if the server is unreachable
        return storage
    except StorageUnavailableError:
        raise
    except ModuleNotFoundError as error:
        hint = " (pip install 'autofinetune[postgres]')" if "psycopg" in str(error) else ""
        raise ConfigError(f"storage: the driver for {safe!r} is not installed: {error}{hint}") from None
    except Exception as error:
        raise ConfigError(f"storage: cannot open {safe!r}: {_redacted_error(error, url)}") from None


#: Database drivers a URL may name, by the module that must import: shown when a URL names none.
_DRIVERS = {
    "sqlite": "sqlite3",
    "postgresql+psycopg": "psycopg",
    "postgresql+psycopg2": "psycopg2",
    "mysql+pymysql": "pymysql",
    "mysql+mysqldb": "MySQLdb",
    "oracle+oracledb": "oracledb",
    "mssql+pyodbc": "pyodbc",
}


def installed_drivers() -> list[str]:
    """The SQLAlchemy dialect+driver names whose driver module is installed here."""
    import importlib.util

    return [name for name, module in _DRIVERS.items() if importlib.util.find_spec(module) is not None]


def _parsed_url(url: str):
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:
        raise ConfigError(
            f"storage: {redact_url(url)!r} is not a SQLAlchemy URL; e.g. sqlite:///autofinetune.db or "
            "postgresql+psycopg://user@host:5432/dbname"
        ) from None


def check_storage_url(url: str) -> None:
    """Refuse a URL that SQLAlchemy cannot parse or whose dialect is not installed, without
    connecting (``launch`` checks it before it starts anything).

    Raises:
        ConfigError: naming the URL (password redacted), why, and the drivers installed here.
    """
    from sqlalchemy.exc import NoSuchModuleError

    parsed = _parsed_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # as open_storage connects
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ConfigError(
            f"storage: {redact_url(url)!r} names the database dialect {parsed.drivername!r}, which SQLAlchemy does not "
            f"know here; installed drivers: {', '.join(installed_drivers())} (e.g. sqlite:///autofinetune.db or "
            "postgresql+psycopg://user@host:5432/dbname)"
        ) from None
    except ImportError as error:  # a known dialect whose driver module is missing
        hint = " (pip install 'autofinetune[postgres]')" if getattr(error, "name", "") == "psycopg" else ""
        raise ConfigError(
            f"storage: the driver for {redact_url(url)!r} is not installed ({error}){hint}; "
            f"installed drivers: {', '.join(installed_drivers())}"
        ) from None


#: Connections one storage keeps open: a worker's main thread and its heartbeat thread use one
#: each. Optuna's default (SQLAlchemy's 5 + 10 overflow) lets 100 workers hold 1500 connections.
POOL_SIZE = 2
POOL_MAX_OVERFLOW = 2
#: Reopen connections older than this: proxies and firewalls drop idle ones silently.
POOL_RECYCLE_SECONDS = 1800

#: Server answers that mean "not now" rather than "never": worth waiting for. Connection refused
#: or a wrong password stay immediate errors (a typo must not hang for a minute).
TRANSIENT_CONNECT_ERRORS = (
    "too many clients",  # PostgreSQL 53300: max_connections reached
    "remaining connection slots are reserved",
    "the database system is starting up",  # 57P03
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many connections",  # MySQL 1040
)


def server_pool_options(url: str, *, connect_retry_seconds: float) -> dict[str, Any]:
    """SQLAlchemy engine options for a database server shared by many workers.

    A small pool per storage bounds the connections of N workers to about ``2 N``, and new
    connections are retried with backoff while the server reports itself full or restarting,
    so a cluster that starts hundreds of workers at once does not lose the ones that lost the
    race for a connection slot.

    Args:
        url: The SQLAlchemy URL (with its real password).
        connect_retry_seconds: How long to keep retrying a transient connection error.
    """
    from sqlalchemy import create_engine

    # A throwaway engine only to build the dialect's connect arguments; it never connects.
    dialect_engine = create_engine(url)
    cargs, cparams = dialect_engine.dialect.create_connect_args(dialect_engine.url)
    dialect = dialect_engine.dialect

    def connect():
        return connect_with_retry(lambda: dialect.connect(*cargs, **cparams), retry_seconds=connect_retry_seconds)

    return {
        "pool_size": POOL_SIZE,
        "max_overflow": POOL_MAX_OVERFLOW,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        "creator": connect,
    }


def connect_with_retry(connect, *, retry_seconds: float, first_wait: float = 0.1, max_wait: float = 5.0):
    """Call ``connect()``; while it fails with a transient server error, wait (exponential
    backoff with jitter, so many workers do not retry in step) and try again, up to
    ``retry_seconds`` in all. Other errors, and the last transient one, are raised."""
    deadline = time.monotonic() + retry_seconds
    wait = first_wait
    while True:
        try:
            return connect()
        except Exception as error:
            message = str(error).lower()
            if not any(marker in message for marker in TRANSIENT_CONNECT_ERRORS):
                raise
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(wait * (0.5 + random.random()))
            wait = min(max_wait, wait * 2)


def _redacted_error(error: BaseException, url: str) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    # Optuna wraps a database error in a generic StorageInternalError: name the root cause.
    cause = error.__cause__ or error.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause):
        text += f" (cause: {str(cause).strip().splitlines()[0]})"
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return f"{type(error).__name__}: {text}"


def _enable_sqlite_wal(path: Path) -> None:
    """Write-ahead logging lets readers (the dashboard, ``status``) work beside a writer."""
    connection = sqlite3.connect(path, timeout=60)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def load_study(name: str, storage) -> Any:
    """Load an existing study.

    Raises:
        ConfigError: no study of that name; the message lists the studies that exist.
    """
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(optuna.get_all_study_names(storage))
        raise ConfigError(
            f"study {name!r} does not exist in this database; existing studies: {', '.join(names) or 'none'}"
        ) from None
