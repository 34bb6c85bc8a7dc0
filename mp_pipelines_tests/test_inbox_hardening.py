"""The inbox sensor skips what it cannot take and still runs the rest.

A file name that is not UTF-8, a link leading out of the inbox (or into /proc) and a Parquet file that is
small on disk but huge once decoded are each skipped with their reason; the good files beside them run.
The last test does it under the real dagster-daemon on PostgreSQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mp_pipelines import definitions
from mp_pipelines.sensors.inbox import FILE_TAG, scan_inbox
from mp_pipelines.spec.loader import SHIPPED_WORKFLOWS_DIR, load_workflows
from mp_pipelines_tests.postgres import temporary_database
from mp_pipelines_tests.services import DagsterServices, dagster_services, pg_env, wait_for, write_instance_config
from mp_pipelines_tests.test_daemon import INBOX_SENSOR, cursor_state, runs, sensor_ticks, tags
from mp_pipelines_tests.test_sensors import LONG_AGO, Inbox, parse_cursor, put, tickets_csv
from mp_pipelines_tests.test_tables_and_paths import write_nested_parquet_bomb, write_parquet_bomb

BAD_NAME = b"bad\xffutf8.csv"
BAD_NAME_SHOWN = "bad\\xffutf8.csv"  # how the sensor log and cursor spell it
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


@pytest.fixture
def inbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MP_INBOX_DIR in a temporary folder; returns the classify_tickets inbox folder (created)."""
    monkeypatch.setenv("MP_INBOX_DIR", str(tmp_path / "inbox"))
    folder = tmp_path / "inbox" / "classify_tickets"
    folder.mkdir(parents=True)
    return folder


def put_bytes_name(folder: Path, name: bytes, content: str) -> None:
    """A settled file whose name is raw bytes (not necessarily UTF-8)."""
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as handle:
        handle.write(content.encode())
    os.utime(path, (LONG_AGO, LONG_AGO))


def put_bad_files(inbox: Path, outside: Path) -> None:
    """Good content under a non-UTF-8 name, links out of the inbox and into /proc, and a Parquet bomb."""
    put_bytes_name(inbox, BAD_NAME, tickets_csv(offset=3))
    outside.mkdir(exist_ok=True)
    put(outside, "elsewhere.csv", tickets_csv(offset=6))
    (inbox / "linked.csv").symlink_to(outside / "elsewhere.csv")
    (inbox / "env.csv").symlink_to("/proc/self/environ")
    write_parquet_bomb(inbox / "bomb.parquet", rows=20, cell_bytes=200_000)  # 4 MB decoded, 200 KB uncompressed
    os.utime(inbox / "bomb.parquet", (LONG_AGO, LONG_AGO))


def test_files_the_sensor_cannot_take_are_skipped_and_the_good_ones_run(
        inbox: Path, tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "1000000")
    put_bad_files(inbox, tmp_path / "outside")
    put(inbox, "good.csv", tickets_csv())
    sensor = Inbox(instance)
    result = sensor.tick()
    assert [r.tags[FILE_TAG] for r in result.run_requests] == ["good.csv"]
    states = parse_cursor(result.cursor)
    assert {name: state.outcome for name, state in states.items()} == {
        BAD_NAME_SHOWN: "skipped", "linked.csv": "skipped", "env.csv": "skipped", "bomb.parquet": "skipped",
        "good.csv": "submitted"}
    assert states[BAD_NAME_SHOWN].reason == "its name is not valid UTF-8, which run tags need; rename it"
    assert states["linked.csv"].reason == (f"refused: file 'linked.csv' of the inbox leads to "
                                           f"{str((tmp_path / 'outside' / 'elsewhere.csv').resolve())!r}, outside "
                                           f"{str(inbox.resolve())!r}; only files whose real path is inside it are read")
    assert states["env.csv"].reason.startswith(f"refused: file 'env.csv' of the inbox leads to "
                                               f"'/proc/{os.getpid()}/environ' in /proc")
    assert states["bomb.parquet"].reason.startswith("too large: input 'tickets': table ")
    assert "once decoded is at least" in states["bomb.parquet"].reason
    # decided once: the next tick neither fails nor retries them
    again = sensor.tick()
    assert not again.run_requests and parse_cursor(again.cursor) == states


def test_a_nested_parquet_column_is_refused_by_the_sensor_from_the_schema(
        inbox: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    write_nested_parquet_bomb(inbox / "nested.parquet", rows=20, cell_bytes=200_000)  # 4 MB decoded
    os.utime(inbox / "nested.parquet", (LONG_AGO, LONG_AGO))
    put(inbox, "good.csv", tickets_csv())
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *args, **kwargs: pytest.fail("table data was read"))
    result = Inbox(instance).tick()
    assert [r.tags[FILE_TAG] for r in result.run_requests] == ["good.csv"]
    state = parse_cursor(result.cursor)["nested.parquet"]
    assert state.outcome == "skipped"
    assert state.reason == (f"refused: input 'tickets': table {str(inbox / 'nested.parquet')!r}: column 'docs' has "
                            "the nested type list<element: string>; table inputs take flat columns only (text, "
                            "numbers, booleans, dates and times): store a nested value as JSON text in a string column")


def test_an_unexpected_error_checking_one_file_skips_only_that_file(inbox: Path) -> None:
    put(inbox, "a.csv", tickets_csv())
    put(inbox, "b.csv", tickets_csv(offset=3))

    def check(path: Path) -> str | None:
        if path.name == "a.csv":
            raise RuntimeError("the checker broke")
        return None

    scan = scan_inbox(inbox, {}, check_table=check, settle_seconds=0)
    assert [batch.name for batch in scan.batches] == ["b.csv"]
    assert scan.files["a.csv"].outcome == "skipped"
    assert scan.files["a.csv"].reason == "cannot check it: RuntimeError: the checker broke"


# --- under the real daemon --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon_inbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DagsterServices, Path, float]]:
    """Webserver + daemon on a fresh PostgreSQL database, started after the inbox already holds its files."""
    root = tmp_path_factory.mktemp("inbox_hardening")
    inbox = root / "inbox" / "classify_tickets"
    inbox.mkdir(parents=True)
    put_bad_files(inbox, root / "outside")
    put(inbox, "good_a.csv", tickets_csv())
    frame = pd.read_csv(SHIPPED_WORKFLOWS_DIR / "data" / "tickets.csv").iloc[9:11]
    put(inbox, "good_b.jsonl", frame.to_json(orient="records", lines=True))
    home = root / "dagster_home"
    write_instance_config(home)
    with temporary_database() as dbname:
        env = {**pg_env(dbname), "MP_INBOX_DIR": str(root / "inbox"), "MP_INBOX_SETTLE_SECONDS": "1",
               "MP_INBOX_INTERVAL_SECONDS": "5", "MP_MAX_TABLE_BYTES": "1000000"}
        started = time.time()
        with dagster_services(home, env) as services:
            yield services, inbox, started


def test_the_daemons_inbox_sensor_launches_exactly_the_good_files(
        daemon_inbox: tuple[DagsterServices, Path, float]) -> None:
    services, _, started = daemon_inbox
    expected = {BAD_NAME_SHOWN: "skipped", "linked.csv": "skipped", "env.csv": "skipped",
                "bomb.parquet": "skipped", "good_a.csv": "submitted", "good_b.jsonl": "submitted"}

    def two_ticks_after_deciding_on_every_file() -> list[dict]:
        ticks = sensor_ticks(services, INBOX_SENSOR, after=started)
        deciding = [i for i, t in enumerate(ticks) if all(cursor_state(t, name) for name in expected)]
        return ticks if deciding and len(ticks) - deciding[0] >= 2 else []

    ticks = wait_for(two_ticks_after_deciding_on_every_file, 240,
                     f"two evaluated ticks of {INBOX_SENSOR} after one decided on every inbox file",
                     interval=1, diagnostics=services.diagnostics)
    assert [t["error"] for t in ticks] == [None] * len(ticks), ticks  # no tick failed, before or after
    assert {name: cursor_state(ticks[-1], name)["outcome"] for name in expected} == expected
    assert "once decoded is at least" in cursor_state(ticks[-1], "bomb.parquet")["reason"]
    launched = runs(services, tags=[{"key": "dagster/sensor_name", "value": INBOX_SENSOR}])
    assert sorted(tags(run)[FILE_TAG] for run in launched) == ["good_a.csv", "good_b.jsonl"]
    for run in launched:
        wait_for(lambda run=run: services.run_status(run["runId"]) in FINISHED, 180, "the inbox run to finish",
                 diagnostics=services.diagnostics)
        assert services.run_status(run["runId"]) == "SUCCESS", services.diagnostics()


def test_no_run_config_is_built_from_a_name_alone(inbox: Path) -> None:
    """Inbox runs carry their file's resolved path in their run config; the job has no partitions whose key could
    name a file outside the inbox folder."""
    job = definitions.build_definitions(load_workflows()).resolve_job_def("classify_tickets")
    assert job.partitions_def is None and job.partitioned_config is None
