"""The pooled PostgreSQL storages (`mp_pipelines.storage`) on a real PostgreSQL server.

Connections are counted on the server: `pg_stat_database.sessions` of the test's own fresh database,
read once every backend has exited, so connections opened by Dagster's step processes count too.
These tests fail (not skip) under CI=true when PostgreSQL is down (`temporary_database`).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_postgres import (
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)

from mp_pipelines.storage import (
    PooledPostgresEventLogStorage,
    PooledPostgresRunStorage,
    PooledPostgresScheduleStorage,
    PoolSettings,
)
from mp_pipelines_tests import pg_jobs
from mp_pipelines_tests.postgres import (
    PG,
    admin_connection,
    postgres_storage_config,
    settled_sessions,
    temporary_database,
)

MODULE = "mp_pipelines.storage"
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
MULTIPROCESS = {"execution": {"config": {"multiprocess": {}}}}
# A hard per-process bound for the counts below: a QueuePool never holds more than
# pool_size + max_overflow connections (it reopens one only if the server drops it).
POOL = {"pool_size": 1, "max_overflow": 0}


# ------------------------------------------------------------------------------------------ helpers


def _pg_config(dbname: str, **pool: Any) -> dict[str, Any]:
    return {**postgres_storage_config(dbname)["postgres"], **pool}


def unified_storage(dbname: str, **pool: Any) -> dict[str, Any]:
    """`storage: custom:` with the all-in-one class."""
    return {"storage": {"custom": {"module": MODULE, "class": "PooledPostgresStorage",
                                   "config": _pg_config(dbname, **pool)}}}


def per_storage(dbname: str, **pool: Any) -> dict[str, Any]:
    """`run_storage:` / `event_log_storage:` / `schedule_storage:` with module/class/config each."""
    config = _pg_config(dbname, **pool)
    return {key: {"module": MODULE, "class": cls, "config": config} for key, cls in (
        ("run_storage", "PooledPostgresRunStorage"),
        ("event_log_storage", "PooledPostgresEventLogStorage"),
        ("schedule_storage", "PooledPostgresScheduleStorage"))}


def stock_storage(dbname: str, **_: Any) -> dict[str, Any]:
    return {"storage": postgres_storage_config(dbname)}


@contextmanager
def open_instance(home: Path, storage: dict[str, Any]) -> Iterator[dg.DagsterInstance]:
    home.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.local_temp(str(home), overrides={**storage, "telemetry": {"enabled": False}}) as inst:
        yield inst


def settled(dbname: str, timeout: float = 30.0) -> int:
    """`settled_sessions`, failing the test when backends stay connected."""
    sessions = settled_sessions(dbname, timeout)
    assert sessions is not None, f"{dbname}: backends still connected after {timeout}s"
    return sessions


def run_fanout(instance: dg.DagsterInstance, run_config: dict[str, Any]) -> str:
    with dg.execute_job(dg.reconstructable(pg_jobs.fanout_job), instance, run_config=run_config) as result:
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        return result.run_id


def sessions_for_one_run(dbname: str, home: Path, storage: dict[str, Any],
                         run_config: dict[str, Any]) -> tuple[int, str]:
    """Connections an instance opens to run the fan-out job once (instance set-up on an existing schema,
    the run in every process it uses, dispose), and the run id. Creating the schema is not counted."""
    with open_instance(home, storage):
        pass
    before = settled(dbname)
    with open_instance(home, storage) as instance:
        run_id = run_fanout(instance, run_config)
    return settled(dbname) - before, run_id


def check_run_reads_back(instance: dg.DagsterInstance, run_id: str) -> list[dg.EventLogEntry]:
    """The run, its steps, events and asset materializations all read back from the storage."""
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert [r.run_id for r in instance.get_runs(filters=dg.RunsFilter(job_name="fanout_job"))] == [run_id]
    stats = instance.get_run_step_stats(run_id)
    assert len(stats) == pg_jobs.STEPS and all(s.status.value == "SUCCESS" for s in stats)

    logs = instance.all_logs(run_id)
    types = [e.dagster_event.event_type for e in logs if e.is_dagster_event]
    assert types.count(dg.DagsterEventType.STEP_SUCCESS) == pg_jobs.STEPS
    last_step = max(i for i, t in enumerate(types) if t == dg.DagsterEventType.STEP_SUCCESS)
    assert types.index(dg.DagsterEventType.RUN_START) < types.index(dg.DagsterEventType.RUN_SUCCESS)
    assert types.index(dg.DagsterEventType.RUN_SUCCESS) > last_step
    storage_ids = [r.storage_id for r in instance.get_records_for_run(run_id, limit=1000).records]
    assert len(storage_ids) == len(logs) and storage_ids == sorted(storage_ids)

    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    items = [r.event_log_entry.asset_materialization for r in records
             if r.event_log_entry.asset_materialization.asset_key == dg.AssetKey(["pg_storage_test", "item"])]
    assert sorted(m.metadata["x"].value for m in items) == list(range(pg_jobs.ITEMS))
    # the indexed tags (asset_event_tags) were written too
    tags = instance.event_log_storage.get_event_tags_for_asset(dg.AssetKey(["pg_storage_test", "item"]))
    assert sorted(t[pg_jobs.DATA_VERSION_TAG] for t in tags) == [f"v{i}" for i in range(pg_jobs.ITEMS)]
    latest = instance.get_latest_materialization_event(dg.AssetKey(["pg_storage_test", "total"]))
    assert latest is not None and latest.run_id == run_id
    assert latest.asset_materialization.metadata["total"].value == pg_jobs.EXPECTED_TOTAL
    assert dg.AssetKey(["pg_storage_test", "item"]) in instance.all_asset_keys()
    return logs


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    with temporary_database() as dbname:
        yield dbname


# ------------------------------------------------------------------------------------ configuration


def test_pool_settings_defaults_and_validation() -> None:
    assert PoolSettings.from_config({}) == PoolSettings()
    settings = PoolSettings.from_config({"pool_size": 3, "max_overflow": 0, "pool_recycle": -1})
    assert (settings.pool_size, settings.max_overflow, settings.pool_recycle) == (3, 0, -1)
    with pytest.raises(ValueError, match="pool_size"):
        PoolSettings(pool_size=0)


@pytest.mark.parametrize("style", [unified_storage, per_storage], ids=["storage_custom", "per_storage"])
def test_instance_config_builds_pooled_storages(pg_db: str, tmp_path: Path, style: Any) -> None:
    with open_instance(tmp_path, style(pg_db, pool_size=3, max_overflow=1, pool_recycle=600)) as instance:
        storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
        classes = (PooledPostgresRunStorage, PooledPostgresEventLogStorage, PooledPostgresScheduleStorage)
        stock = (PostgresRunStorage, PostgresEventLogStorage, PostgresScheduleStorage)
        for storage, cls, base in zip(storages, classes, stock, strict=True):
            assert isinstance(storage, cls) and isinstance(storage, base)
            assert storage.pool_settings == PoolSettings(pool_size=3, max_overflow=1, pool_recycle=600)
        # one pool per process for the three storages
        assert len({id(s.engine) for s in storages}) == 1
        engine = storages[0].engine
        assert type(engine.pool).__name__ == "QueuePool" and engine.pool.size() == 3

        # what a run worker or a step process does: rebuild the instance from its ref
        with dg.DagsterInstance.from_ref(instance.get_ref()) as rebuilt:
            assert isinstance(rebuilt.event_log_storage, PooledPostgresEventLogStorage)
            assert isinstance(rebuilt.run_storage, PooledPostgresRunStorage)
            assert rebuilt.event_log_storage.pool_settings.pool_size == 3


def test_optimize_for_webserver_keeps_the_pool_and_sets_statement_timeout(pg_db: str, tmp_path: Path) -> None:
    with open_instance(tmp_path, unified_storage(pg_db, pool_size=4)) as instance:
        instance.optimize_for_webserver(statement_timeout=5000, pool_recycle=1800, max_overflow=20)
        storage = instance.event_log_storage
        assert storage.engine.pool.size() == 4 and storage.pool_settings.pool_size == 4
        with storage.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
        assert instance.get_runs() == []


# ------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("style", [unified_storage, per_storage], ids=["storage_custom", "per_storage"])
def test_in_process_run_reads_back(pg_db: str, tmp_path: Path, style: Any) -> None:
    with open_instance(tmp_path, style(pg_db)) as instance:
        run_id = run_fanout(instance, IN_PROCESS)
        check_run_reads_back(instance, run_id)
        # asset writes run in a READ COMMITTED transaction; the pooled connection comes back in autocommit
        with instance.event_log_storage.engine.connect() as conn:
            assert conn.connection.dbapi_connection.autocommit is True


def test_no_write_path_holds_one_pooled_connection_while_waiting_for_another(pg_db: str, tmp_path: Path) -> None:
    """A single pooled connection and no overflow are enough for a run with asset events and indexed tags.
    (dagster-postgres opens a second connection inside an asset-event transaction; the pooled storage
    answers those lookups once, so many step threads can never deadlock the pool holding one each.)"""
    storage = unified_storage(pg_db, pool_size=1, max_overflow=0, pool_timeout=5)
    with open_instance(tmp_path, storage) as instance:
        run_id = run_fanout(instance, IN_PROCESS)
        check_run_reads_back(instance, run_id)
        assert instance.event_log_storage.engine.pool.checkedout() == 0


# ------------------------------------------------------------------------------------- connections


@pytest.mark.parametrize("run_config", [IN_PROCESS, MULTIPROCESS], ids=["in_process", "multiprocess"])
def test_pooled_storage_opens_far_fewer_connections_than_stock(tmp_path: Path, run_config: dict) -> None:
    """The same job on stock dagster-postgres and on the pooled storages, each on a fresh database. With
    the multiprocess executor every step runs, and writes its events, in a process of its own."""
    multiprocess = run_config is MULTIPROCESS
    processes = 1 + (pg_jobs.STEPS if multiprocess else 0)
    with temporary_database() as stock_db, temporary_database() as pooled_db:
        stock, _ = sessions_for_one_run(stock_db, tmp_path / "stock", stock_storage(stock_db), run_config)
        pooled_storage = unified_storage(pooled_db, **POOL)
        pooled, run_id = sessions_for_one_run(pooled_db, tmp_path / "pooled", pooled_storage, run_config)
        print(f"connections for one run of {pg_jobs.STEPS} steps: stock={stock} pooled={pooled}")

        # pooled: at most pool_size + max_overflow per process (the run process, plus one per step if multiprocess)
        assert 1 <= pooled <= processes * (POOL["pool_size"] + POOL["max_overflow"])
        # stock (NullPool): a connection for every read and write, so several per step, in every process
        assert stock >= 3 * pg_jobs.STEPS
        assert stock >= 5 * pooled

        # what the pooled storages wrote, from every process, reads back
        with open_instance(tmp_path / "pooled", pooled_storage) as instance:
            logs = check_run_reads_back(instance, run_id)
        step_pids = {e.asset_materialization.metadata["pid"].value for e in logs
                     if e.is_dagster_event and e.dagster_event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
                     and e.asset_materialization.asset_key == dg.AssetKey(["pg_storage_test", "item"])}
        if multiprocess:  # the mapped steps really ran in other processes, one each
            assert os.getpid() not in step_pids and len(step_pids) == pg_jobs.ITEMS
        else:
            assert step_pids == {os.getpid()}


# ---------------------------------------------------------------------------------- event watching


def test_event_watcher_and_notify_work_through_the_pool(pg_db: str, tmp_path: Path) -> None:
    import psycopg2

    listener = psycopg2.connect(dbname=pg_db, connect_timeout=5, **PG)
    listener.autocommit = True
    with listener.cursor() as cursor:
        cursor.execute("LISTEN run_events")
    try:
        with open_instance(tmp_path, unified_storage(pg_db)) as instance:
            run_id = run_fanout(instance, IN_PROCESS)
            stored = len(instance.all_logs(run_id))

            # dagster-postgres still NOTIFYs '<run_id>_<storage id>' for every stored event
            notified: list[str] = []
            deadline = time.monotonic() + 10
            while len(notified) < stored and time.monotonic() < deadline:
                if select.select([listener], [], [], 0.5)[0]:
                    listener.poll()
                    notified.extend(n.payload for n in listener.notifies)
                    listener.notifies.clear()
            assert len(notified) == stored and all(p.startswith(f"{run_id}_") for p in notified)

            # the (polling) event watcher delivers the run's events to a callback from its own thread
            seen: list[dg.EventLogEntry] = []
            done = threading.Event()

            def callback(entry: dg.EventLogEntry, cursor: str) -> None:
                seen.append(entry)
                if len(seen) >= stored:
                    done.set()

            instance.event_log_storage.watch(run_id, None, callback)
            try:
                assert done.wait(15), f"watcher delivered {len(seen)} of {stored} events"
            finally:
                instance.event_log_storage.end_watch(run_id, callback)
            watched = [e.dagster_event.event_type for e in seen if e.is_dagster_event]
            assert dg.DagsterEventType.RUN_SUCCESS in watched
            assert len(seen) == stored
    finally:
        listener.close()


# --------------------------------------------------------------------------------- process safety


def _backend_pid(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())


def test_forked_child_drops_the_inherited_pool(pg_db: str, tmp_path: Path) -> None:
    with open_instance(tmp_path, unified_storage(pg_db)) as instance:
        engine = instance.event_log_storage.engine
        parent_backend = _backend_pid(engine)
        assert engine.pool.checkedin() == 1
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # child: must not touch the parent's connection
            status = 1
            try:
                os.close(read)
                inherited = engine.pool.checkedin()
                child_backend = _backend_pid(engine)
                instance.run_storage.set_cursor_values({"written_by": f"child {os.getpid()}"})
                os.write(write, f"{inherited} {child_backend}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        _, wait_status = os.waitpid(child, 0)
        inherited, child_backend = (int(x) for x in os.read(read, 100).decode().split())
        os.close(read)
        assert os.waitstatus_to_exitcode(wait_status) == 0
        assert inherited == 0  # the child started with an empty pool
        assert child_backend != parent_backend  # and opened its own connection
        # the parent's pooled connection is intact: same server backend, still usable, sees the child's write
        assert _backend_pid(engine) == parent_backend
        assert instance.run_storage.get_cursor_values({"written_by"}) == {"written_by": f"child {child}"}


def test_a_connection_from_another_process_is_never_checked_out(pg_db: str, tmp_path: Path) -> None:
    with open_instance(tmp_path, unified_storage(pg_db)) as instance:
        engine = instance.run_storage.engine
        with engine.connect() as conn:
            first_backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
            foreign = conn.connection.dbapi_connection
            conn.connection.info["pid"] = os.getpid() + 1_000_000  # as if opened by another process
        assert _backend_pid(engine) != first_backend  # refused at checkout, a new one was opened
        assert foreign.closed == 0  # and the foreign connection was left alone, not closed under its owner
        foreign.close()


def test_a_dropped_pooled_connection_is_replaced_on_checkout(pg_db: str, tmp_path: Path) -> None:
    """pool_pre_ping (default on): a pooled connection the server has dropped is replaced, not used."""
    with open_instance(tmp_path, unified_storage(pg_db)) as instance:
        engine = instance.run_storage.engine
        dropped = _backend_pid(engine)
        admin = admin_connection()
        try:
            with admin.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", (dropped,))
                assert cursor.fetchone()[0] is True
        finally:
            admin.close()
        assert instance.get_runs() == []  # no error reaches the caller
        assert _backend_pid(engine) != dropped


def test_a_pool_slot_is_never_claimed_twice(pg_db: str, tmp_path: Path) -> None:
    """Twenty steps claim a pool of two at the same instant (threads, each on its own pooled connection)."""
    with open_instance(tmp_path / "home", unified_storage(pg_db, pool_size=20, max_overflow=0)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("race", 2)
        start = threading.Barrier(20)
        claimed: list[str] = []

        def claim(step: int) -> None:
            start.wait()
            status = storage.claim_concurrency_slot("race", "run-1", f"step_{step}")
            if status.is_claimed:
                claimed.append(f"step_{step}")

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        info = storage.get_concurrency_info("race")
        assert len(claimed) == info.active_slot_count == 2
