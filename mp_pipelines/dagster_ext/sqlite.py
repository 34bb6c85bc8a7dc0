"""Dagster's SQLite storage with one open connection per database file instead of one per statement.

Written against **dagster 1.13.27** (SQLAlchemy 2.0.x); every Dagster internal used here is listed in
`compat.py` and checked by mp_pipelines_tests/test_architecture.py.

Why: Dagster's SQLite storages build a new `NullPool` engine for every read and write. The event log
storage's `_connect(shard)` runs `create_engine` + `connect` + `commit` + `dispose` for each event, and a
step writes about a dozen events; the run storage's `connect()` does the same for every run update. On an
offline `mp-pipelines run research_report` that is most of the run's execution time.

What changes: `_connect` (event log) and `connect` (run storage) take their connection from an engine kept
per database file (a small `QueuePool`; the event log keeps the most recently used `ENGINES_KEPT` shards and
disposes the rest), and each new SQLite connection is set to `PRAGMA synchronous=NORMAL`. A run's own events
(all but the asset, check and run-status events Dagster mirrors into the index shard) are inserted with one
statement compiled once, the row bound as parameters. Everything else is Dagster's own code: the same files
(`history/runs.db`, `history/runs/<run_id>.db`, `index.db`), schema, rows, other statements, transactions
(`with conn.begin()` per use) and the event log's per-storage lock.

Durability and other processes: Dagster creates these databases in WAL mode (`PRAGMA journal_mode=WAL`,
stored in the file). In WAL mode `synchronous=NORMAL` never corrupts the database and keeps every committed
transaction across a crash of the *process* (the data is in the WAL file, in the OS page cache); only a
power loss or OS crash can lose the last transactions before the next checkpoint. Connections are only held
between statements, never inside an open transaction, so the webserver, the daemon and other runs that open
the same files (with stock Dagster or with this class) see each commit as they do today: WAL is safe for
concurrent processes on one machine. On `os.fork` the child drops inherited engines without closing the
parent's connections.

Use it in dagster.yaml with `storage: custom: {module: mp_pipelines.dagster_ext.sqlite, class:
PooledSqliteStorage, config: {base_dir: ...}}`; `mp-pipelines run` uses it for its local instance.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import sqlite3
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import sqlalchemy as db
import sqlalchemy.exc as db_exc
import yaml
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from dagster import StringSource
from dagster import __version__ as DAGSTER_VERSION
from dagster._config.config_schema import UserConfigSchema
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, EVENT_TYPE_TO_PIPELINE_RUN_STATUS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata, SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sql import get_alembic_config
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS, create_db_conn_string
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClassData
from sqlalchemy import event
from sqlalchemy.engine import Connection

from mp_pipelines.dagster_ext.compat import checked_overrides

ENGINES_KEPT = 8  # event-log shards (runs) whose connection stays open in one storage
# Events Dagster's `store_event` also mirrors into the index shard (asset, asset check, run status): stored by it.
_MIRRORED_EVENTS = frozenset(ASSET_EVENTS) | frozenset(ASSET_CHECK_EVENTS) | frozenset(EVENT_TYPE_TO_PIPELINE_RUN_STATUS)
_INSERT_EVENT = SqlEventLogStorageTable.insert()  # compiled once; each event binds its row as parameters
_LIVE_ENGINES: weakref.WeakSet[db.engine.Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Forget inherited engines without closing the parent's SQLite connections."""
    for engine in list(_LIVE_ENGINES):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def pooled_sqlite_engine(conn_string: str) -> db.engine.Engine:
    """An engine that keeps its SQLite connection open between uses, with `synchronous=NORMAL` (WAL)."""
    engine = db.create_engine(conn_string, poolclass=db.pool.QueuePool, pool_size=1, max_overflow=15,
                              connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    _LIVE_ENGINES.add(engine)
    return engine


@functools.lru_cache(maxsize=1)
def _alembic_scripts() -> ScriptDirectory:
    """Dagster's migration scripts, read once per process (reading them costs ~50 ms; Dagster reads them again
    for every database it opens)."""
    return ScriptDirectory.from_config(get_alembic_config(inspect.getfile(SqliteEventLogStorage)))


def _stamped(conn: Connection) -> bool:
    """Whether the database carries an alembic revision: Dagster set it up (the stock code then changes nothing)."""
    return MigrationContext.configure(conn).get_current_revision() is not None


def _set_up_already(conn_string: str, path: str, tables: tuple[str, ...]) -> bool:
    """Whether the SQLite file at `path` exists, is stamped and has `tables`: then Dagster's `from_local` would only
    read the migration scripts to find that out."""
    if not os.path.exists(path):
        return False
    engine = db.create_engine(conn_string, poolclass=db.pool.NullPool,
                              connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    try:
        with engine.connect() as conn:
            return _stamped(conn) and set(tables) <= set(db.inspect(conn).get_table_names())
    except (db_exc.DatabaseError, sqlite3.DatabaseError):
        return False
    finally:
        engine.dispose()


@checked_overrides
class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` whose per-shard connections stay open (see the module docstring)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines: OrderedDict[str, db.engine.Engine] = OrderedDict()
        # not `*.db`: Dagster's listings of run shards (get_all_run_ids, wipe) never take it for one
        self._template = os.path.join(os.path.abspath(base_dir), f".empty-run-shard-dagster-{DAGSTER_VERSION}.template")
        super().__init__(base_dir, inst_data=inst_data)
        if not os.path.exists(self._template):  # set up with the folder, as Dagster sets up index.db
            with suppress(OSError, db_exc.DatabaseError, sqlite3.DatabaseError):
                self._write_template()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> PooledSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine_for(self, shard: str) -> db.engine.Engine:
        engine = self._engines.get(shard)
        if engine is None:
            engine = self._engines[shard] = pooled_sqlite_engine(self.conn_string_for_shard(shard))
            while len(self._engines) > ENGINES_KEPT:
                _, oldest = self._engines.popitem(last=False)
                oldest.dispose()
        else:
            self._engines.move_to_end(shard)
        return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            engine = self._engine_for(shard)
            if shard not in self._initialized_dbs:
                if shard != INDEX_SHARD_NAME:
                    self._shard_from_template(shard)
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def store_event(self, event: EventLogEntry) -> None:
        """A run's own events (step starts, inputs, outputs, logs: all but those Dagster mirrors into the index
        shard) go in as one insert with the row as bound parameters, the statement compiled once per process;
        Dagster's code builds and compiles an `INSERT … VALUES` per event (0.45 against 0.3 ms an event here).
        The row is Dagster's own (`_event_to_row`), in the same table of the run's shard."""
        if event.is_dagster_event and event.dagster_event_type in _MIRRORED_EVENTS:
            super().store_event(event)
            return
        with self.run_connection(event.run_id) as conn:
            conn.execute(_INSERT_EVENT, self._event_to_row(event))

    def _shard_from_template(self, shard: str) -> None:
        """Create a new run's shard as a copy of an empty one made once per folder and Dagster version (the same
        tables, WAL mode and alembic stamp `_initdb` gives it): a file copy instead of ~30 ms of DDL at every run's
        start. The copy appears under the shard's name atomically (a hard link), never over a shard that exists; when
        it cannot (no hard links here), `_initdb` creates the shard as before."""
        path = self.path_for_shard(shard)
        if os.path.exists(path):
            return
        copy = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            if not os.path.exists(self._template):
                self._write_template()
            shutil.copyfile(self._template, copy)
            os.link(copy, path)
        except FileExistsError:
            pass  # another process created the shard: it is used as it is
        except (OSError, db_exc.DatabaseError, sqlite3.DatabaseError):
            return
        finally:
            with suppress(OSError):
                os.unlink(copy)

    def _write_template(self) -> None:
        """An empty run shard, set up as `_initdb` sets up a new one, closed (checkpointed) and renamed into place."""
        building = f"{self._template}.{os.getpid()}.{threading.get_ident()}.tmp"
        engine = db.create_engine(f"sqlite:///{building}", poolclass=db.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                SqlEventLogStorageMetadata.create_all(conn)
                MigrationContext.configure(conn).stamp(_alembic_scripts(), "head")
                conn.commit()
            os.replace(building, self._template)
        finally:
            engine.dispose()
            with suppress(OSError):
                os.unlink(building)

    def _initdb(self, engine: db.engine.Engine, for_index_shard: bool = False) -> None:
        """Dagster's set-up of a shard, without reading the migration scripts when the shard is set up already, and
        reading them once per process when a new run's shard is created (create tables, WAL, stamp head: what the
        stock code does for a new file). Anything else (the index shard, an unstamped file with tables, another
        process creating the same file) goes to Dagster's own code and its retries."""
        try:
            with engine.connect() as conn:
                if _stamped(conn):
                    return
                if not for_index_shard and not db.inspect(conn).get_table_names():
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    SqlEventLogStorageMetadata.create_all(conn)
                    MigrationContext.configure(conn).stamp(_alembic_scripts(), "head")
                    conn.commit()
                    return
        except (db_exc.DatabaseError, sqlite3.DatabaseError):
            pass
        super()._initdb(engine, for_index_shard=for_index_shard)

    def _dispose_engines(self) -> None:
        with self._db_lock:
            engines, self._engines = list(self._engines.values()), OrderedDict()
        for engine in engines:
            engine.dispose()

    def wipe(self) -> None:
        self._dispose_engines()  # the run shards' files are deleted: no open connection may outlive them
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        self._dispose_engines()


class _OneOpenConnection:
    """What the pooled run and schedule storages share: one engine kept for their one database file
    (`<base_dir>/<_DB>.db`), whose tables `_TABLES` tell that Dagster has set the file up already."""

    _DB: str
    _TABLES: tuple[str, ...]

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None):
        super().__init__(conn_string, inst_data=inst_data)  # type: ignore[call-arg]
        self._engine = pooled_sqlite_engine(conn_string)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Any:
        return cls.from_local(inst_data=inst_data, **config_value)

    @classmethod
    def from_local(cls, base_dir: str, inst_data: ConfigurableClassData | None = None) -> Any:
        conn_string = create_db_conn_string(base_dir, cls._DB)
        if _set_up_already(conn_string, os.path.join(base_dir, f"{cls._DB}.db"), cls._TABLES):
            return cls(conn_string, inst_data)
        return super().from_local(base_dir, inst_data=inst_data)  # type: ignore[misc]  # creates, stamps, migrates

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            with conn.begin():
                yield conn

    def dispose(self) -> None:
        super().dispose()  # type: ignore[misc]
        self._engine.dispose()


@checked_overrides
class PooledSqliteRunStorage(_OneOpenConnection, SqliteRunStorage):
    """`SqliteRunStorage` whose connection to runs.db stays open (see the module docstring)."""

    _DB = "runs"
    _TABLES = ("runs", "instance_info")


@checked_overrides
class PooledSqliteScheduleStorage(_OneOpenConnection, SqliteScheduleStorage):
    """`SqliteScheduleStorage` whose connection to schedules.db stays open (see the module docstring)."""

    _DB = "schedules"
    _TABLES = ("jobs", "job_ticks")


class PooledSqliteStorage(DagsterSqliteStorage):
    """Dagster's SQLite storage (`storage: sqlite:`, the same files under `base_dir`) with the pooled event
    log, run and schedule storages."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self.base_dir = base_dir
        self._run_storage = PooledSqliteRunStorage.from_local(os.path.join(base_dir, "history", ""))
        self._event_log_storage = PooledSqliteEventLogStorage(os.path.join(base_dir, "history", "runs", ""))
        self._schedule_storage = PooledSqliteScheduleStorage.from_local(os.path.join(base_dir, "schedules"))
        self._inst_data = inst_data
        DagsterStorage.__init__(self)

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return {"base_dir": StringSource}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> PooledSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)

    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        return ConfigurableClassData(__name__, "PooledSqliteEventLogStorage",
                                     yaml.safe_dump({"base_dir": os.path.join(self.base_dir, "history", "runs", "")}))

    @property
    def run_storage_data(self) -> ConfigurableClassData | None:
        return ConfigurableClassData(__name__, "PooledSqliteRunStorage",
                                     yaml.safe_dump({"base_dir": os.path.join(self.base_dir, "history", "")}))

    @property
    def schedule_storage_data(self) -> ConfigurableClassData | None:
        return ConfigurableClassData(__name__, "PooledSqliteScheduleStorage",
                                     yaml.safe_dump({"base_dir": os.path.join(self.base_dir, "schedules")}))


def pooled_storage_config(base_dir: str) -> dict[str, Any]:
    """The `storage:` entry of an instance config (dagster.yaml or instance overrides) for this storage."""
    return {"custom": {"module": __name__, "class": "PooledSqliteStorage", "config": {"base_dir": base_dir}}}
