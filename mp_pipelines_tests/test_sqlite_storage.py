"""The pooled SQLite storage (mp_pipelines/dagster_ext/sqlite.py) behind the CLI's local instance and the `ui`
instance config: Dagster's own files, schema and revision; readable by stock Dagster while a run writes; events
committed before a process dies are kept."""

from __future__ import annotations

import glob
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mp_pipelines.cli.running import local_instance
from mp_pipelines.cli.ui import INSTANCE_CONFIG
from mp_pipelines.dagster_ext.sqlite import (
    PooledSqliteEventLogStorage,
    PooledSqliteRunStorage,
    PooledSqliteScheduleStorage,
)

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    drop = ("DAGSTER_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL", "MP_LLM_PROVIDER", "MP_WORKFLOWS_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return {**env, **extra}


def _storages(instance: dg.DagsterInstance) -> tuple[type, type, type]:
    return (type(instance.run_storage), type(instance.event_log_storage), type(instance.schedule_storage))


POOLED = (PooledSqliteRunStorage, PooledSqliteEventLogStorage, PooledSqliteScheduleStorage)


def _instance(home: Path, pooled: bool) -> dg.DagsterInstance:
    """A persistent instance in `home`: Dagster's stock SQLite storage, or the pooled one on the same files."""
    home.mkdir(parents=True, exist_ok=True)
    overrides = {"storage": {"custom": {"module": "mp_pipelines.dagster_ext.sqlite", "class": "PooledSqliteStorage",
                                        "config": {"base_dir": str(home)}}}} if pooled else None
    return dg.DagsterInstance.local_temp(str(home), overrides=overrides)


def test_local_instance_is_pooled_unless_the_home_chooses_a_storage(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    with local_instance() as instance:
        assert _storages(instance) == POOLED
        assert Path(instance.root_directory) == (tmp_path / ".mp_pipelines" / "dagster_home").resolve()

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (home / "dagster.yaml").write_text("telemetry: {enabled: false}\n")  # no storage named: pooled, same files
    with local_instance() as instance:
        assert _storages(instance) == POOLED
    (home / "dagster.yaml").write_text(INSTANCE_CONFIG)  # what `mp-pipelines ui` writes: pooled by its config
    with local_instance() as instance:
        assert _storages(instance) == POOLED
        assert instance.get_ref().storage_data.class_name == "PooledSqliteStorage"
    (home / "dagster.yaml").write_text(f"storage:\n  sqlite:\n    base_dir: {home}\n")  # a choice is kept
    with local_instance() as instance:
        assert not set(_storages(instance)) & set(POOLED)


def _schema(path: str) -> tuple[Any, ...]:
    with sqlite3.connect(path) as conn:
        return (conn.execute("SELECT version_num FROM alembic_version").fetchall(),
                conn.execute("PRAGMA journal_mode").fetchone(),
                sorted(row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")))


def _one_run(instance: dg.DagsterInstance) -> str:
    @dg.op
    def hello() -> int:
        return 1

    @dg.job
    def tiny() -> None:
        hello()

    result = tiny.execute_in_process(instance=instance)
    assert result.success
    return result.run_id


def test_a_new_run_shard_is_what_dagster_itself_creates(tmp_path: Path) -> None:
    stock, pooled = _instance(tmp_path / "stock", False), _instance(tmp_path / "pooled", True)
    try:
        assert _storages(pooled) == POOLED
        stock_run, pooled_run = _one_run(stock), _one_run(pooled)
        for name in ("history/runs.db", "schedules/schedules.db", "history/runs/index.db"):
            assert _schema(str(tmp_path / "pooled" / name)) == _schema(str(tmp_path / "stock" / name)), name
        assert _schema(str(tmp_path / "pooled" / "history" / "runs" / f"{pooled_run}.db")) == _schema(
            str(tmp_path / "stock" / "history" / "runs" / f"{stock_run}.db"))
        # the pooled shard is a copy of the folder's empty shard, which Dagster's listing of runs does not take for one
        [template] = (tmp_path / "pooled" / "history" / "runs").glob(".empty-run-shard-dagster-*.template")
        assert _schema(str(template)) == _schema(str(tmp_path / "stock" / "history" / "runs" / f"{stock_run}.db"))
        assert pooled.event_log_storage.get_all_run_ids() == [pooled_run]
        second_run = _one_run(pooled)
        assert _schema(str(tmp_path / "pooled" / "history" / "runs" / f"{second_run}.db")) == _schema(str(template))
        kinds = [r.event_log_entry.dagster_event_type for r in pooled.get_records_for_run(pooled_run).records]
        assert kinds == [r.event_log_entry.dagster_event_type for r in stock.get_records_for_run(stock_run).records]
    finally:
        stock.dispose()
        pooled.dispose()
    # Stock Dagster opens what the pooled storage wrote, and the other way round.
    with _instance(tmp_path / "pooled", False) as reopened:
        assert reopened.get_run_by_id(pooled_run).status == dg.DagsterRunStatus.SUCCESS
        assert reopened.get_records_for_run(pooled_run).records


READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import dagster as dg
    home, stop, pooled = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "pooled"
    overrides = {"storage": {"custom": {"module": "mp_pipelines.dagster_ext.sqlite", "class": "PooledSqliteStorage",
                                        "config": {"base_dir": home}}}} if pooled else None
    instance = dg.DagsterInstance.local_temp(home, overrides=overrides)
    reads = errors = 0
    while not stop.exists():
        try:
            for run in instance.get_runs(limit=10):
                instance.get_records_for_run(run.run_id, limit=1000)
            reads += 1
        except Exception as exc:  # any error while the other process writes is a finding
            errors += 1
            print(repr(exc), file=sys.stderr)
        time.sleep(0.02)
    runs = {r.run_id: [r.status.value, len(instance.get_records_for_run(r.run_id, limit=100000).records)]
            for r in instance.get_runs()}
    print(json.dumps({"reads": reads, "errors": errors, "runs": runs}))
""")


def test_cli_runs_while_stock_and_pooled_readers_poll_the_same_files(tmp_path: Path) -> None:
    import json

    home = tmp_path / ".mp_pipelines" / "dagster_home"
    env = _env()
    first = subprocess.run([sys.executable, "-m", "mp_pipelines.cli", "run", "research_report", "-i", "topic=one",
                            "-i", "max_questions=2", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    stop = tmp_path / "stop"
    readers = {kind: subprocess.Popen([sys.executable, "-c", READER, str(home), str(stop), kind], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for kind in ("stock", "pooled")}
    try:
        time.sleep(1.0)
        runs = [subprocess.run([sys.executable, "-m", "mp_pipelines.cli", "run", "research_report", "-i",
                                f"topic=concurrent {i}", "-i", "max_questions=2", "--json"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300) for i in range(2)]
    finally:
        stop.touch()
    outputs = {kind: reader.communicate(timeout=120) for kind, reader in readers.items()}
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    seen = {}
    for kind, (out, err) in outputs.items():
        report = json.loads(out.strip().splitlines()[-1])
        assert report["errors"] == 0, f"{kind} reader: {err[-3000:]}"
        assert report["reads"] > 0
        seen[kind] = report["runs"]
    run_ids = [json.loads(first.stdout)["run_id"], *(json.loads(d.stdout)["run_id"] for d in runs)]
    assert seen["stock"] == seen["pooled"]
    for run_id in run_ids:
        status, events = seen["stock"][run_id]
        assert status == "SUCCESS" and events > 50, (run_id, status, events)


RUN_ID = "0b7d4c52-7a51-4c1e-9a34-3d7e6c1f0e11"
KILLED = textwrap.dedent("""
    import os, signal, sys
    import dagster as dg
    home, events, RUN_ID = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(home)
    overrides = {"storage": {"custom": {"module": "mp_pipelines.dagster_ext.sqlite", "class": "PooledSqliteStorage",
                                        "config": {"base_dir": home}}}}
    instance = dg.DagsterInstance.local_temp(home, overrides=overrides)
    run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), run_id=RUN_ID)
    for i in range(events):
        instance.report_engine_event(f"event {i}", run)
    with instance.event_log_storage.run_connection(RUN_ID) as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar(), conn.exec_driver_sql("PRAGMA synchronous").scalar()
    print(mode, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no dispose, no atexit, no interpreter shutdown
""")


def test_events_committed_before_a_killed_process_are_kept(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-c", KILLED, home, "40", RUN_ID], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9, done.stderr[-3000:]
    assert done.stdout.strip() == "('wal', 1)"  # WAL with synchronous=NORMAL (1) on the pooled connections
    with _instance(Path(home), False) as stock:
        messages = [r.event_log_entry.dagster_event.message for r in stock.get_records_for_run(RUN_ID).records]
    assert [m for m in messages if m.startswith("event ")] == [f"event {i}" for i in range(40)]
    assert glob.glob(os.path.join(home, "history", "runs", f"{RUN_ID}.db"))


@pytest.mark.parametrize("wipe", [False, True])
def test_dispose_and_wipe_close_the_kept_connections(tmp_path: Path, wipe: bool) -> None:
    instance = _instance(tmp_path, True)
    run_id = _one_run(instance)
    events = instance.event_log_storage
    assert run_id in events._engines  # noqa: SLF001 - the run's shard connection was kept
    if wipe:
        events.wipe()
        assert run_id not in events._engines  # noqa: SLF001 - closed before its file was deleted
        assert not (tmp_path / "history" / "runs" / f"{run_id}.db").exists()
        assert instance.get_records_for_run(run_id).records == []
    instance.dispose()
    assert not events._engines  # noqa: SLF001


def test_a_runs_own_events_are_the_rows_dagster_writes(tmp_path: Path) -> None:
    """The pooled storage inserts a run's own events (logs, step events) with its own compiled statement: the rows in
    the run's shard are column for column what Dagster's code writes for the same events, and the events Dagster
    mirrors into the index shard (run status, assets) still are."""
    from dagster._core.events import DagsterEvent, EngineEventData
    from dagster._core.events.log import EventLogEntry
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    def entry(kind: str, message: str, step: str | None = None) -> EventLogEntry:
        event = DagsterEvent(event_type_value=kind, job_name="j", step_key=step, message=message,
                             event_specific_data=EngineEventData() if kind == "ENGINE_EVENT" else None)
        return EventLogEntry(user_message=message, level=20, job_name="j", run_id="run-1", error_info=None,
                             timestamp=1_700_000_000.5, step_key=step, dagster_event=event)

    events = [entry("ENGINE_EVENT", "engine"), entry("PIPELINE_START", "started"),
              EventLogEntry(user_message="a log line", level=20, job_name="j", run_id="run-1", error_info=None,
                            timestamp=1_700_000_001.0, step_key="s", dagster_event=None),
              entry("PIPELINE_SUCCESS", "done")]
    rows = {}
    for name, kind in (("stock", SqliteEventLogStorage), ("pooled", PooledSqliteEventLogStorage)):
        storage = kind(str(tmp_path / name))
        for event in events:
            storage.store_event(event)
        storage.dispose()
        rows[name] = [sqlite3.connect(tmp_path / name / f"{db}.db").execute(
            "SELECT run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition FROM event_logs "
            "ORDER BY id").fetchall() for db in ("run-1", "index")]
    assert rows["pooled"] == rows["stock"]
    assert len(rows["pooled"][0]) == 4 and len(rows["pooled"][1]) == 2  # the run status events are mirrored
