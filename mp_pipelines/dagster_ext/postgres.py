"""dagster-postgres storages with pooled connections.

Written against **dagster-postgres 0.29.27** (dagster 1.13.27, SQLAlchemy 2.0.x): `compat.py` names the
versions and lists every Dagster / dagster-postgres internal used here (imports, overridden methods,
private attributes), and mp_pipelines_tests/test_architecture.py checks that they all still exist. Re-read
this module and `pg_engines.py` when either is upgraded: like the rest of `mp_pipelines.dagster_ext`, they
may lean on Dagster / dagster-postgres internals, which no other package of mp_pipelines may.

Why: every dagster-postgres storage builds its SQLAlchemy engine with `NullPool`, so each read or
write (`create_pg_connection(self._engine)`) opens a new PostgreSQL connection (TCP/socket, backend
fork, auth) and closes it afterwards. A mapped step writes about 9-13 events, each on its own connection.
These classes keep dagster-postgres' behaviour, SQL and schema handling and change one thing: the
engine behind `_connect()` / `connect()` is a `QueuePool` engine, shared by the run, event log and
schedule storages of one process that point at the same database with the same pool settings. The
engines, their sharing and their process safety (fork handling, a pid check at checkout) are in
`pg_engines.py`; `PoolSettings` is re-exported here.

Internal surface used (keep it this small; the full list, checked by the tests, is in `compat.py`):

* the `_engine` attribute of `PostgresEventLogStorage`, `PostgresRunStorage` and
  `PostgresScheduleStorage`: every connection they open comes from it. It is replaced after
  `__init__`, exactly as their own `optimize_for_webserver` does for the webserver.
* their `__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)` signature; with
  `should_autocreate_tables=False` it opens no connection.
* the table names each stock `__init__` checks before creating or migrating its schema
  (`_SCHEMA_MISSING` below); when one is missing, the stock class itself is instantiated once to create
  the schema, so table creation, stamping and data migrations stay dagster-postgres' own code.
* `PostgresEventLogStorage.has_table` / `has_secondary_index` (with `ASSET_KEY_INDEX_COLS`): the two
  lookups dagster-postgres makes on a second connection while holding one (writing an asset event);
  answered at construction and cached, so that writes do not hold one pooled connection while waiting
  for another (a pool of 1 runs the tests' jobs; many step threads cannot deadlock a full pool).
* `SqlEventLogStorage._claim_concurrency_slot(concurrency_key, run_id, step_key) -> ConcurrencySlotStatus`
  and `ConcurrencySlotsTable`: replaced by one atomic UPDATE (the stock SELECT … FOR UPDATE then UPDATE
  runs on an AUTOCOMMIT connection, so its lock does not cover the UPDATE and two processes can share a
  slot).
* `dagster_postgres.utils` helpers (here the config and retry ones; `pg_engines.py` uses the engine
  ones), `dagster._core.storage.config.pg_config` (the config schema we extend),
  `dagster._serdes.ConfigurableClass(Data)` and `dagster._core.storage.base_storage.DagsterStorage`.

Each overriding class is decorated with `compat.checked_overrides`: if Dagster renamed or removed a method
overridden here (which would leave the override silently unused), importing this module fails with
`DagsterCompatError`, naming the method and the Dagster versions.

Event watching: dagster-postgres 0.29.27 watches runs with `SqlPollingEventWatcher` (threads that
poll `get_records_for_run`, here through the pool) and still sends `NOTIFY run_events, '<run>_<id>'`
after every stored event for version skew with older LISTEN-based watchers; both are inherited
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import sqlalchemy as db
from dagster import BoolSource, Field, IntSource
from dagster._config.config_schema import UserConfigSchema
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.config import pg_config
from dagster._core.storage.event_log.migration import ASSET_KEY_INDEX_COLS
from dagster._core.storage.event_log.schema import ConcurrencySlotsTable
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster._utils.concurrency import ConcurrencySlotStatus
from dagster_postgres import (
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)
from dagster_postgres.utils import (
    get_token_provider_from_config,
    pg_url_from_config,
    retry_pg_connection_fn,
)

from mp_pipelines.dagster_ext.compat import WRITTEN_AGAINST as WRITTEN_AGAINST  # the pinned versions
from mp_pipelines.dagster_ext.compat import checked_overrides
from mp_pipelines.dagster_ext.pg_engines import POOL_CONFIG_KEYS as POOL_CONFIG_KEYS  # re-exported
from mp_pipelines.dagster_ext.pg_engines import (
    PoolSettings,
    create_pooled_engine,
    shared_pooled_engine,
)

if TYPE_CHECKING:
    from dagster_postgres.auth import PgTokenProvider

# --------------------------------------------------------------------------------------------------
# Config: dagster-postgres' own plus the pool settings
# --------------------------------------------------------------------------------------------------


def pooled_pg_config() -> UserConfigSchema:
    """dagster-postgres' storage config (`postgres_url` | `postgres_db`, `auth_provider`,
    `should_autocreate_tables`) plus the pool settings."""
    d = PoolSettings()
    return {
        **pg_config(),  # type: ignore[dict-item]
        "pool_size": Field(IntSource, is_required=False, default_value=d.pool_size,
                           description="Connections kept open per process (opened lazily)."),
        "max_overflow": Field(IntSource, is_required=False, default_value=d.max_overflow,
                              description="Extra connections allowed under load, closed when returned."),
        "pool_recycle": Field(IntSource, is_required=False, default_value=d.pool_recycle,
                              description="Seconds after which a pooled connection is replaced (-1: never)."),
        "pool_timeout": Field(IntSource, is_required=False, default_value=d.pool_timeout,
                              description="Seconds to wait for a free connection before failing."),
        "pool_pre_ping": Field(BoolSource, is_required=False, default_value=d.pool_pre_ping,
                               description="Test a pooled connection before use (survives server restarts)."),
    }


# --------------------------------------------------------------------------------------------------
# The storages
# --------------------------------------------------------------------------------------------------

# The table check each stock `__init__` (0.29.27) runs when `should_autocreate_tables` is set: True when
# the stock constructor would create or migrate something.
_SCHEMA_MISSING: dict[type, Callable[[set[str]], bool]] = {
    PostgresEventLogStorage: lambda names: "event_logs" not in names,
    PostgresRunStorage: lambda names: "runs" not in names or "instance_info" not in names,
    PostgresScheduleStorage: lambda names: "schedules" not in names and "jobs" not in names,
}


def _table_names(engine: db.engine.Engine) -> set[str]:
    return set(retry_pg_connection_fn(lambda: db.inspect(engine).get_table_names()))


def _constructor_args(inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]) -> dict[str, Any]:
    """What every pooled storage class is built from, read from its dagster.yaml config."""
    return {"postgres_url": pg_url_from_config(config_value),
            "should_autocreate_tables": config_value.get("should_autocreate_tables", True),
            "inst_data": inst_data, "token_provider": get_token_provider_from_config(config_value),
            "pool": PoolSettings.from_config(config_value)}


class _PooledMixin:
    """Shared construction for the three pooled storages. `_stock` is the dagster-postgres class."""

    _stock: type
    _engine: db.engine.Engine
    postgres_url: str
    should_autocreate_tables: bool

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: PgTokenProvider | None = None,
        pool: PoolSettings | None = None,
    ):
        self._table_names = self._init_pooled(postgres_url, should_autocreate_tables, inst_data, token_provider, pool)

    def dispose(self) -> None:
        super().dispose()  # the stock storage's own clean-up (the event log's polling watcher threads)
        self._dispose_pool()

    def _init_pooled(
        self,
        postgres_url: str,
        should_autocreate_tables: bool,
        inst_data: ConfigurableClassData | None,
        token_provider: PgTokenProvider | None,
        pool: PoolSettings | None,
    ) -> set[str] | None:
        """Set up on the shared pooled engine; return the database's table names if they were read."""
        pool = pool or PoolSettings()
        engine = shared_pooled_engine(postgres_url, pool, token_provider)
        names = None
        if should_autocreate_tables:
            names = _table_names(engine)
            if _SCHEMA_MISSING[self._stock](names):
                # First use of this database: let dagster-postgres create, stamp and migrate its schema.
                self._stock(postgres_url, True, token_provider=token_provider)
                names = _table_names(engine)
        # With should_autocreate_tables=False the stock __init__ only builds a NullPool engine (no connection).
        self._stock.__init__(self, postgres_url, False, inst_data=inst_data, token_provider=token_provider)  # type: ignore[misc]
        self.should_autocreate_tables = should_autocreate_tables
        self._engine = engine
        self._pool_settings = pool
        self._pool_token_provider = token_provider
        return names

    @property
    def pool_settings(self) -> PoolSettings:
        return self._pool_settings

    @property
    def engine(self) -> db.engine.Engine:
        """The pooled engine behind every connection of this storage."""
        return self._engine

    def optimize_for_webserver(self, statement_timeout: int, pool_recycle: int, max_overflow: int) -> None:
        # Like dagster-postgres: a statement timeout on a private engine; unlike it, keep our pool size.
        pool = replace(self._pool_settings, pool_recycle=pool_recycle,
                       max_overflow=max(max_overflow, self._pool_settings.max_overflow))
        self._engine = create_pooled_engine(self.postgres_url, pool, self._pool_token_provider, statement_timeout)

    def _dispose_pool(self) -> None:
        # Close idle pooled connections; the engine stays usable (a new pool opens on demand).
        self._engine.dispose()

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return pooled_pg_config()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]) -> Any:
        return cls(**_constructor_args(inst_data, config_value))


@checked_overrides
class PooledPostgresEventLogStorage(_PooledMixin, PostgresEventLogStorage):
    """`PostgresEventLogStorage` on a connection pool (carries the ~13 event writes of every step)."""

    _stock = PostgresEventLogStorage

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        names = self._table_names
        # Answer now what asset events would otherwise ask on a second connection while holding the
        # first (see has_table): the tables that exist, and whether the asset key index is built.
        self._tables_seen: set[str] = names if names is not None else _table_names(self._engine)
        self.has_secondary_index(ASSET_KEY_INDEX_COLS)

    def _claim_concurrency_slot(self, concurrency_key: str, run_id: str, step_key: str) -> ConcurrencySlotStatus:
        # dagster 1.13.27 selects a free slot `FOR UPDATE SKIP LOCKED`, then updates it by id, on this storage's
        # AUTOCOMMIT connection: the row lock ends with the SELECT, so two run workers claiming at the same
        # instant can both take one slot (seen: 3 steps in a pool of 2). One UPDATE does both atomically.
        slots = ConcurrencySlotsTable.c
        free = (db.select(slots.id)
                .where(slots.concurrency_key == concurrency_key, slots.step_key.is_(None), slots.deleted.is_(False))
                .limit(1).with_for_update(skip_locked=True).scalar_subquery())
        with self.index_connection() as conn:
            claimed = conn.execute(ConcurrencySlotsTable.update()
                                   .where(slots.id == free, slots.step_key.is_(None))
                                   .values(run_id=run_id, step_key=step_key)).rowcount
        return ConcurrencySlotStatus.CLAIMED if claimed else ConcurrencySlotStatus.BLOCKED

    def has_table(self, table_name: str) -> bool:
        # dagster-postgres asks this on every asset event with indexed tags (data versions, partitions),
        # on a second connection while the first is held in `index_transaction`. Nested checkouts from
        # many step threads could exhaust a pool (each holding one, waiting for another), so a table seen
        # once is remembered: tables are only ever added under a running instance, by migrations.
        if table_name in self._tables_seen:
            return True
        found = super().has_table(table_name)
        if found:
            self._tables_seen.add(table_name)
        return found


@checked_overrides
class PooledPostgresRunStorage(_PooledMixin, PostgresRunStorage):
    """`PostgresRunStorage` on a connection pool."""

    _stock = PostgresRunStorage


@checked_overrides
class PooledPostgresScheduleStorage(_PooledMixin, PostgresScheduleStorage):
    """`PostgresScheduleStorage` on a connection pool."""

    _stock = PostgresScheduleStorage


class PooledPostgresStorage(DagsterStorage, ConfigurableClass):
    """All three pooled storages from one config block: `storage: custom:` in dagster.yaml.

    The counterpart of `dagster_postgres.DagsterPostgresStorage` (what `storage: postgres:` builds).
    """

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: PgTokenProvider | None = None,
        pool: PoolSettings | None = None,
    ):
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        args = (postgres_url, should_autocreate_tables)
        self._run_storage = PooledPostgresRunStorage(*args, token_provider=token_provider, pool=pool)
        self._event_log_storage = PooledPostgresEventLogStorage(*args, token_provider=token_provider, pool=pool)
        self._schedule_storage = PooledPostgresScheduleStorage(*args, token_provider=token_provider, pool=pool)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return pooled_pg_config()

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PooledPostgresStorage:
        return cls(**_constructor_args(inst_data, config_value))

    @property
    def event_log_storage(self) -> PooledPostgresEventLogStorage:
        return self._event_log_storage

    @property
    def run_storage(self) -> PooledPostgresRunStorage:
        return self._run_storage

    @property
    def schedule_storage(self) -> PooledPostgresScheduleStorage:
        return self._schedule_storage

    def _part(self, class_name: str) -> ConfigurableClassData | None:
        if self._inst_data is None:
            return None
        return ConfigurableClassData(__name__, class_name, self._inst_data.config_yaml)

    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        return self._part("PooledPostgresEventLogStorage")

    @property
    def run_storage_data(self) -> ConfigurableClassData | None:
        return self._part("PooledPostgresRunStorage")

    @property
    def schedule_storage_data(self) -> ConfigurableClassData | None:
        return self._part("PooledPostgresScheduleStorage")
