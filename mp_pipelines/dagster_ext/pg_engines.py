"""Pooled SQLAlchemy engines for the dagster-postgres storages: one per process and database, fork-safe.

Written against **dagster-postgres 0.29.27** (SQLAlchemy 2.0.x): engines are built by dagster-postgres'
own `create_pg_engine` (AUTOCOMMIT, the token hook of cloud workload identity) and, for the webserver,
`set_pg_statement_timeout`; both undocumented helpers are listed in `compat.py` and checked by
mp_pipelines_tests/test_architecture.py. The storages that use these engines are in `postgres.py`.

Engine sharing: `shared_pooled_engine` hands the run, event log and schedule storages of one process that
point at the same database with the same pool settings one `QueuePool` engine. Engines with a token
provider are not shared.

Process safety: a pooled connection must never be used by two processes. Dagster's multiprocess executor
spawns (or forkservers) its step processes, and those rebuild the instance, hence new engines; for plain
`os.fork` (the `fork` start method, a forking run launcher, user code) every live pooled engine is
disposed in the child with `engine.dispose(close=False)` (SQLAlchemy's recommended pattern: the
child drops the inherited pool without closing the parent's sockets), and a checkout-time pid check
refuses any connection that was opened in another process (before the optional pre-ping, so that not
even a ping crosses processes). Engines are thread-safe: the polling event watcher threads and a
threaded executor's step threads share the pool.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as db
from dagster_postgres.utils import create_pg_engine, set_pg_statement_timeout
from sqlalchemy import event, exc

if TYPE_CHECKING:
    from dagster_postgres.auth import PgTokenProvider


@dataclass(frozen=True)
class PoolSettings:
    """SQLAlchemy `QueuePool` settings (see `create_engine`); `pool_recycle=-1` never recycles."""

    pool_size: int = 5
    max_overflow: int = 10
    pool_recycle: int = 3600
    pool_timeout: int = 30
    pool_pre_ping: bool = True

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {self.pool_size}")
        if self.max_overflow < -1:
            raise ValueError(f"max_overflow must be -1 (unlimited) or more, got {self.max_overflow}")
        if self.pool_timeout < 0:
            raise ValueError(f"pool_timeout must not be negative, got {self.pool_timeout}")

    @classmethod
    def from_config(cls, config_value: Mapping[str, Any]) -> PoolSettings:
        defaults = cls()
        return cls(**{name: config_value.get(name, getattr(defaults, name)) for name in POOL_CONFIG_KEYS})

    def engine_kwargs(self) -> dict[str, Any]:
        # pool_pre_ping is done by our checkout listener, after the process check (see _guard_checkout)
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_recycle": self.pool_recycle,
            "pool_timeout": self.pool_timeout,
        }


POOL_CONFIG_KEYS = ("pool_size", "max_overflow", "pool_recycle", "pool_timeout", "pool_pre_ping")

# Every pooled engine alive in this process, so that a forked child can drop them all.
_LIVE_ENGINES: weakref.WeakSet[db.engine.Engine] = weakref.WeakSet()
# Engines shared between the storages of one process: (url, pool settings) -> engine.
_SHARED_ENGINES: weakref.WeakValueDictionary[tuple[str, PoolSettings], db.engine.Engine] = (
    weakref.WeakValueDictionary()
)
_REGISTRY_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """Drop inherited pools without touching the parent's sockets (SQLAlchemy's `dispose(close=False)`)."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()  # another parent thread may have held it at fork time
    for engine in list(_LIVE_ENGINES):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _guard_checkout(engine: db.engine.Engine, pre_ping: bool) -> None:
    """At checkout, refuse a connection opened in another process, then (optionally) ping it.

    The process check is SQLAlchemy's documented recipe for pools that may cross a fork. The ping is done
    here rather than with `create_engine(pool_pre_ping=True)` because SQLAlchemy pings *before* running
    checkout listeners, which would send a query over a socket that belongs to another process.
    Raising `DisconnectionError` makes the pool discard the record and hand out a fresh connection.
    """

    @event.listens_for(engine, "connect")
    def _remember_pid(dbapi_connection: Any, connection_record: Any) -> None:
        connection_record.info["pid"] = os.getpid()
        connection_record.info["fresh"] = True

    @event.listens_for(engine, "checkout")
    def _check(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
        pid = os.getpid()
        owner = connection_record.info.get("pid", pid)
        if owner != pid:
            # Forget the DBAPI connection without closing it: it belongs to the other process.
            connection_record.dbapi_connection = connection_proxy.dbapi_connection = None
            raise exc.DisconnectionError(f"pooled connection opened by pid {owner}, checked out in pid {pid}")
        if connection_record.info.pop("fresh", False) or not pre_ping:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as err:  # a dropped connection (server restart, idle timeout): replace it
            raise exc.DisconnectionError(f"pooled connection failed its ping: {err}") from err


def create_pooled_engine(
    postgres_url: str,
    pool: PoolSettings,
    token_provider: PgTokenProvider | None = None,
    statement_timeout: int | None = None,
) -> db.engine.Engine:
    """A new pooled engine configured like dagster-postgres' (AUTOCOMMIT, token hook), not shared."""
    engine = create_pg_engine(postgres_url, token_provider, isolation_level="AUTOCOMMIT", **pool.engine_kwargs())
    _guard_checkout(engine, pool.pool_pre_ping)
    if statement_timeout is not None:
        event.listen(engine, "connect", lambda connection, _: set_pg_statement_timeout(connection, statement_timeout))
    _LIVE_ENGINES.add(engine)
    return engine


def shared_pooled_engine(
    postgres_url: str, pool: PoolSettings, token_provider: PgTokenProvider | None = None
) -> db.engine.Engine:
    """The process-wide engine for (url, pool settings); the three storages of an instance share it.

    Engines with a token provider (cloud workload identity) are not shared: each storage keeps its own.
    """
    if token_provider is not None:
        return create_pooled_engine(postgres_url, pool, token_provider)
    key = (postgres_url, pool)
    with _REGISTRY_LOCK:
        engine = _SHARED_ENGINES.get(key)
        if engine is None:
            engine = create_pooled_engine(postgres_url, pool)
            _SHARED_ENGINES[key] = engine
        return engine
