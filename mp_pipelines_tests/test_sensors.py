"""Schedules, the inbox sensors (one run per new table file, tagged with it) and the failure sensor."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from mp_pipelines import definitions
from mp_pipelines.cli.running import run_workflow
from mp_pipelines.factory.names import (
    ITEM_RECORDS,
    body_step,
    collect_step,
    items_step,
    loop_step,
    mapped_step,
    task_step,
)
from mp_pipelines.factory.partitions import inbox_input, inbox_run_config
from mp_pipelines.factory.schedules import build_schedule
from mp_pipelines.sensors.failures import (
    FAILURE_SENSOR_NAME,
    build_failure_sensor,
    task_of_step,
)
from mp_pipelines.sensors.inbox import (
    FILE_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
    build_inbox_sensor,
    inbox_sensor_name,
    parse_cursor,
)
from mp_pipelines.spec.loader import SHIPPED_WORKFLOWS_DIR, load_workflows
from mp_pipelines_tests.workflow_helpers import materializations, write_workflow

SPECS = load_workflows().specs
TICKETS = SHIPPED_WORKFLOWS_DIR / "data" / "tickets.csv"
LONG_AGO = time.time() - 3600


@pytest.fixture
def inbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MP_INBOX_DIR in a temporary folder; returns the classify_tickets inbox folder (created)."""
    monkeypatch.setenv("MP_INBOX_DIR", str(tmp_path / "inbox"))
    monkeypatch.setenv("MP_INBOX_SETTLE_SECONDS", "5")
    folder = tmp_path / "inbox" / "classify_tickets"
    folder.mkdir(parents=True)
    return folder


class SensorLog:
    """What sensors logged: their InstigationLogger is no child of the root logger (caplog cannot see it)
    and writes through the instance's console handler to stderr, which capfd captures."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.seen = ""

    @property
    def text(self) -> str:
        out, err = self.capfd.readouterr()
        self.seen += out + err
        return self.seen

    def clear(self) -> None:
        _ = self.text
        self.seen = ""


@pytest.fixture
def sensor_log(capfd: pytest.CaptureFixture[str]) -> SensorLog:
    """The sensor log lines written during the test."""
    return SensorLog(capfd)


def put(folder: Path, name: str, content: bytes | str, *, settled: bool = True) -> Path:
    """Write a file into the inbox; `settled` back-dates it so it no longer looks half-written."""
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    if settled:
        os.utime(path, (LONG_AGO, LONG_AGO))
    return path


def tickets_csv(rows: int = 3, offset: int = 0) -> str:
    frame = pd.read_csv(TICKETS).iloc[offset:offset + rows]
    return frame.to_csv(index=False)


class Inbox:
    """The classify_tickets inbox sensor, ticked by hand the way the daemon does (cursor carried over)."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.sensor = build_inbox_sensor(SPECS["classify_tickets"])
        self.cursor: str | None = None
        self.defs = definitions.build_definitions(load_workflows())

    def tick(self) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursor, definitions=self.defs)
        result = self.sensor(context)
        assert isinstance(result, dg.SensorResult), result
        self.cursor = result.cursor
        return result

    def launch(self, request: dg.RunRequest) -> dg.DagsterRun:
        """Record a run as the sensor daemon would launch it (its run key and sensor name as tags)."""
        job = self.defs.resolve_job_def("classify_tickets")
        tags = {**request.tags, RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: self.sensor.name}
        return self.instance.create_run_for_job(job, run_config=request.run_config, tags=tags)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- schedules ---------------------------------------------------------------------------------------


def test_a_schedule_tick_requests_a_run_with_the_schedules_inputs() -> None:
    spec = SPECS["research_report"]
    job = definitions.defs().resolve_job_def("research_report")
    schedule = definitions.defs().resolve_schedule_def("research_report_schedule")
    assert schedule.cron_schedule == "0 6 * * 1" and schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2025, 3, 3, 6, tzinfo=UTC))
    data = schedule.evaluate_tick(context)
    (request,) = data.run_requests
    assert request.run_config == {"ops": {"inputs": {"config": {"topic": spec.schedule.inputs["topic"]}}}}
    assert dg.validate_run_config(job, request.run_config)["ops"]["research_report__inputs"]["config"]["max_questions"] == 5


def test_a_table_workflows_schedule_runs_its_configured_file(tmp_path: Path) -> None:
    path = write_workflow(tmp_path, {
        "name": "nightly_tickets", "schedule": {"cron": "0 2 * * *", "enabled": True,
                                                "inputs": {"tickets": str(TICKETS)}},
        "inputs": {"tickets": {"type": "table"}},
        "tasks": [{"name": "label", "for_each": "inputs.tickets", "prompt": "Label: {{ item.subject }}"}]})
    spec = load_workflows([path]).specs["nightly_tickets"]
    job = definitions.build_definitions(load_workflows([path])).resolve_job_def("nightly_tickets")
    assert inbox_input(spec) == "tickets" and job.partitions_def is None  # it takes inbox batches, as runs
    schedule = build_schedule(spec, job)
    assert schedule is not None and schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    (request,) = schedule.evaluate_tick(dg.build_schedule_context()).run_requests
    dg.validate_run_config(job, request.run_config)
    assert request.run_config["ops"]["inputs"]["config"]["tickets"] == str(TICKETS)


# --- inbox workflows ---------------------------------------------------------------------------------


def test_table_workflows_take_inbox_files_and_their_assets_are_not_partitioned() -> None:
    assert inbox_input(SPECS["classify_tickets"]) == "tickets"
    assert inbox_input(SPECS["summarize_documents"]) == "documents"
    assert inbox_input(SPECS["research_report"]) is None
    defs = definitions.defs()
    # a run of a workflow, however started, materializes its assets' latest values: `ops.inputs.config` is the
    # inputs' path for every job (a partitioned job would take no config mapping, see factory/job.py)
    assert defs.resolve_job_def("classify_tickets").partitions_def is None
    assert all(node.partitions_def is None for node in defs.resolve_asset_graph().asset_nodes
               if node.key.path[0] in ("classify_tickets", "research_report"))
    names = {s.name for s in defs.sensors}
    assert {"classify_tickets_inbox_sensor", "summarize_documents_inbox_sensor", FAILURE_SENSOR_NAME} <= names
    assert "research_report_inbox_sensor" not in names


def test_an_inbox_run_reads_its_file_and_materialises_the_assets(inbox: Path, instance: dg.DagsterInstance) -> None:
    path = put(inbox, "batch_1.csv", tickets_csv(2))
    job = definitions.build_definitions(load_workflows()).resolve_job_def("classify_tickets")
    result = job.execute_in_process(instance=instance, run_config=inbox_run_config(SPECS["classify_tickets"], path))
    assert result.success
    frame = result.output_for_node(collect_step("classify_tickets", "classify"), ITEM_RECORDS)
    assert len(frame) == 2 and list(pd.DataFrame(list(frame["row"]))["id"]) == list(pd.read_csv(TICKETS)["id"][:2])
    events = materializations(instance, result.run_id)
    assert {tuple(e.asset_key.path) for e in events} >= {("classify_tickets", "classify")}


# --- inbox sensor ------------------------------------------------------------------------------------


def test_a_new_file_starts_one_run_with_that_file(
        inbox: Path, instance: dg.DagsterInstance) -> None:
    path = put(inbox, "monday.csv", tickets_csv())
    sensor = Inbox(instance)
    result = sensor.tick()
    (request,) = result.run_requests
    assert request.run_key == sha256(path)
    assert request.run_config == {"ops": {"inputs": {"config": {"tickets": str(path.resolve())}}}}
    assert request.tags[FILE_TAG] == "monday.csv"
    # the run config is valid for the job
    dg.validate_run_config(sensor.defs.resolve_job_def("classify_tickets"), request.run_config)
    # the next tick has nothing to do and does not re-read the file
    again = sensor.tick()
    assert not again.run_requests and "no new files" in again.skip_reason.skip_message


def test_the_sensor_result_is_accepted_by_dagster(inbox: Path, instance: dg.DagsterInstance) -> None:
    put(inbox, "a.jsonl", pd.read_csv(TICKETS).head(2).to_json(orient="records", lines=True))
    put(inbox, "b.parquet", b"")
    pd.read_csv(TICKETS).head(2).to_parquet(inbox / "b.parquet")
    os.utime(inbox / "b.parquet", (LONG_AGO, LONG_AGO))
    sensor = Inbox(instance)
    context = dg.build_sensor_context(instance_ref=instance.get_ref(), definitions=sensor.defs)
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        data = sensor.sensor.evaluate_tick(context)  # Dagster's own checks of run requests
    assert sorted(r.tags[FILE_TAG] for r in data.run_requests) == ["a.jsonl", "b.parquet"]
    assert parse_cursor(data.cursor)["a.jsonl"].outcome == "submitted"


def test_identical_files_run_once(inbox: Path, instance: dg.DagsterInstance, sensor_log: SensorLog) -> None:
    put(inbox, "copy_a.csv", tickets_csv())
    put(inbox, "copy_b.csv", tickets_csv())
    result = Inbox(instance).tick()
    assert [r.tags[FILE_TAG] for r in result.run_requests] == ["copy_a.csv"]
    assert "copy_b.csv: skipped, same content" in sensor_log.text and "as copy_a.csv" in sensor_log.text


def test_a_renamed_identical_file_is_not_processed_again(inbox: Path, instance: dg.DagsterInstance,
                                                         sensor_log: SensorLog) -> None:
    sensor = Inbox(instance)
    first = put(inbox, "upload.csv", tickets_csv())
    (request,) = sensor.tick().run_requests
    first.rename(inbox / "upload_renamed.csv")
    result = sensor.tick()
    assert not result.run_requests
    assert "upload_renamed.csv: skipped, same content" in sensor_log.text
    # changed content under the old name is a new batch
    put(inbox, "upload.csv", tickets_csv(offset=3))
    (changed,) = sensor.tick().run_requests
    assert changed.tags[FILE_TAG] == "upload.csv" and changed.run_key != request.run_key


def test_a_restart_without_the_cursor_does_not_reprocess(inbox: Path, instance: dg.DagsterInstance) -> None:
    put(inbox, "batch.csv", tickets_csv())
    sensor = Inbox(instance)
    (request,) = sensor.tick().run_requests
    run = sensor.launch(request)
    fresh = Inbox(instance)  # a new sensor with no cursor: only the instance remembers
    put(inbox, "batch_copy.csv", tickets_csv())
    result = fresh.tick()
    assert not result.run_requests
    assert parse_cursor(result.cursor)["batch_copy.csv"].reason == f"same content as batch.csv (run {run.run_id})"


def test_malformed_and_unreadable_files_are_skipped_once_with_a_reason(
        inbox: Path, instance: dg.DagsterInstance, sensor_log: SensorLog) -> None:
    put(inbox, "broken.jsonl", '{"id": 1, "subject": "ok", "body": "fine"}\n{"id": 2, "subject": \n')
    put(inbox, "empty.csv", "id,subject,body\n")
    put(inbox, "garbage.parquet", b"this is not parquet at all")
    put(inbox, "notes.txt", "read me")
    (inbox / "gone.csv").symlink_to(inbox / "nowhere.csv")
    put(inbox, "good.csv", tickets_csv())
    sensor = Inbox(instance)
    result = sensor.tick()
    assert [r.tags[FILE_TAG] for r in result.run_requests] == ["good.csv"]
    states = parse_cursor(result.cursor)
    assert states["broken.jsonl"].outcome == "skipped" and "malformed" in states["broken.jsonl"].reason
    assert "has no rows" in states["empty.csv"].reason
    assert "malformed" in states["garbage.parquet"].reason and "garbage.parquet" in states["garbage.parquet"].reason
    assert "not a .csv" in states["notes.txt"].reason
    assert "cannot read it" in states["gone.csv"].reason
    for name in ("broken.jsonl", "empty.csv", "garbage.parquet", "gone.csv"):
        assert f"{name}: skipped, " in sensor_log.text and "not retried until it changes" in sensor_log.text
    # not retried (nor logged again) while unchanged …
    sensor_log.clear()
    assert not sensor.tick().run_requests
    assert "broken.jsonl" not in sensor_log.text and "gone.csv" not in sensor_log.text
    # … and picked up once fixed
    put(inbox, "broken.jsonl", pd.read_csv(TICKETS).head(2).to_json(orient="records", lines=True))
    os.utime(inbox / "broken.jsonl", (LONG_AGO + 60, LONG_AGO + 60))
    (fixed,) = sensor.tick().run_requests
    assert fixed.tags[FILE_TAG] == "broken.jsonl"


def test_partially_written_files_wait_until_complete(inbox: Path, instance: dg.DagsterInstance,
                                                     sensor_log: SensorLog) -> None:
    content = tickets_csv(5)
    growing = put(inbox, "growing.csv", content[: len(content) // 2], settled=False)  # just written
    put(inbox, "upload.csv.part", content)  # a writer's temporary name
    sensor = Inbox(instance)
    result = sensor.tick()
    assert not result.run_requests
    assert "growing.csv: modified" in sensor_log.text and "may still be being written" in sensor_log.text
    assert "upload.csv.part" not in sensor_log.text and "growing.csv" not in parse_cursor(result.cursor)
    # the writer finishes and renames; once settled both are new batches
    growing.write_text(content)
    os.utime(growing, (LONG_AGO, LONG_AGO))
    (inbox / "upload.csv.part").rename(inbox / "upload.csv")
    os.utime(inbox / "upload.csv", (LONG_AGO, LONG_AGO))
    (request,) = sensor.tick().run_requests  # identical content: one run
    assert request.tags[FILE_TAG] == "growing.csv"
    # a Parquet file cut off mid-write (and then left alone) is malformed, not a crash
    frame = pd.read_csv(TICKETS)
    frame.to_parquet(inbox / "cut.parquet")
    data = (inbox / "cut.parquet").read_bytes()
    put(inbox, "cut.parquet", data[: len(data) // 2])
    result = sensor.tick()
    assert not result.run_requests and "malformed" in parse_cursor(result.cursor)["cut.parquet"].reason


def test_a_missing_inbox_folder_is_a_skip_with_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        instance: dg.DagsterInstance) -> None:
    monkeypatch.setenv("MP_INBOX_DIR", str(tmp_path / "nowhere"))
    sensor = build_inbox_sensor(SPECS["classify_tickets"])
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING  # MP_INBOX_DIR set: on by default
    result = sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SkipReason) and str(tmp_path / "nowhere" / "classify_tickets") in result.skip_message
    monkeypatch.delenv("MP_INBOX_DIR")
    assert build_inbox_sensor(SPECS["classify_tickets"]).default_status == dg.DefaultSensorStatus.STOPPED
    assert inbox_sensor_name(SPECS["classify_tickets"]) == "classify_tickets_inbox_sensor"
    assert build_inbox_sensor(SPECS["research_report"]) is None


# --- run failure sensor ------------------------------------------------------------------------------


def test_task_of_step_keys() -> None:
    assert task_of_step(mapped_step("research_report", "research", "3")) == "research"
    assert task_of_step(items_step("research_report", "research")) == "research"
    assert task_of_step(collect_step("research_report", "research")) == "research"
    assert task_of_step(body_step("research_report", "refine", "critique", 2)) == "critique"
    assert task_of_step(loop_step("research_report", "refine")) == "refine"
    assert task_of_step(task_step("research_report", "plan")) == "plan"
    assert task_of_step("research_report__research.research[3]") == "research"  # the spelling users see



def failure_context(instance: dg.DagsterInstance, run_id: str) -> dg.RunFailureSensorContext:
    """The context Dagster gives the run-failure sensor for the failed run `run_id`."""
    (failure,) = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return dg.build_run_status_sensor_context(
        sensor_name=FAILURE_SENSOR_NAME, dagster_event=failure.event_log_entry.dagster_event,
        dagster_instance=instance, dagster_run=instance.get_run_by_id(run_id)).for_run_failure()

def test_a_failed_run_is_recorded_with_its_task_and_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          instance: dg.DagsterInstance,
                                                          sensor_log: SensorLog) -> None:
    log_file = tmp_path / "failures.jsonl"
    monkeypatch.setenv("MP_FAILURE_LOG", str(log_file))
    monkeypatch.setenv("MP_INPUT_ROOTS", str(tmp_path))
    missing = tmp_path / "missing.csv"
    outcome = run_workflow(SPECS["classify_tickets"], {"tickets": str(missing)}, executor="in_process",
                           instance=instance)
    assert not outcome.success
    build_failure_sensor()(failure_context(instance, outcome.run_id))
    (line,) = log_file.read_text().splitlines()
    record = json.loads(line)
    assert record["workflow"] == "classify_tickets" and record["run_id"] == outcome.run_id
    (failed,) = record["failures"]
    assert failed["task"] == "classify" and failed["step"].startswith("classify")
    assert "does not exist" in failed["error"] and str(missing) in failed["error"]
    assert f"run {outcome.run_id} of workflow classify_tickets failed in task classify" in sensor_log.text
    (observation,) = instance.fetch_observations(dg.AssetKey(["classify_tickets", "classify"]), limit=5).records
    metadata = observation.asset_observation.metadata
    assert metadata["run_id"].value == outcome.run_id and "does not exist" in metadata["error"].value


def test_the_failure_sensor_ignores_runs_of_other_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        instance: dg.DagsterInstance) -> None:
    monkeypatch.setenv("MP_FAILURE_LOG", str(tmp_path / "failures.jsonl"))

    @dg.op
    def boom() -> None:
        raise RuntimeError("not a workflow")

    @dg.job
    def other_job() -> None:
        boom()

    result = other_job.execute_in_process(instance=instance, raise_on_error=False)
    build_failure_sensor()(failure_context(instance, result.run_id))
    assert not (tmp_path / "failures.jsonl").exists()
