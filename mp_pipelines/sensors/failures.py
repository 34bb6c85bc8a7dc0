"""The run-failure sensor: every failed workflow run is recorded with the task that failed and its error.

Each failure becomes a warning in the sensor's log, an asset observation on the failing task's asset
(so the asset page shows it next to the materializations) and one JSON line in a file
(`MP_FAILURE_LOG`, default `<DAGSTER_HOME>/mp_pipelines/failed_runs.jsonl`), so batch failures are
visible without opening each run.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from mp_pipelines.factory.names import WORKFLOW_TAG, task_of_step

FAILURE_LOG_ENV = "MP_FAILURE_LOG"
FAILURE_SENSOR_NAME = "mp_pipelines_run_failure_sensor"
_ERROR_CHARS = 2000


def _error_text(event: dg.DagsterEvent) -> str:
    data = event.step_failure_data
    if data is None:
        return event.message or "unknown error"
    if data.user_failure_data is not None and data.user_failure_data.description:
        text = data.user_failure_data.description
    elif data.error is not None:
        text = data.error.message
    else:
        text = event.message or "unknown error"
    text = text.strip()
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def failure_record(run: dg.DagsterRun, step_failures: list[dg.DagsterEvent],
                   run_failure: dg.DagsterEvent | None) -> dict[str, Any]:
    """One JSON-able record of a failed run: workflow, run, and each failed task with its error."""
    tasks = [{"task": task_of_step(e.step_key or ""), "step": e.step_key, "error": _error_text(e)}
             for e in step_failures if e.step_key]
    record: dict[str, Any] = {
        "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workflow": run.tags.get(WORKFLOW_TAG, run.job_name),
        "job": run.job_name,
        "run_id": run.run_id,
        "partition": run.tags.get("dagster/partition"),
        "failures": tasks,
    }
    if not tasks:  # the run failed outside any step: bad config, launch or infrastructure error
        record["run_error"] = (run_failure.message if run_failure and run_failure.message else "run failed")
    return record


def failure_log_path(instance: dg.DagsterInstance) -> Path:
    """Where failure records go: MP_FAILURE_LOG, else <instance root>/mp_pipelines/failed_runs.jsonl."""
    configured = os.environ.get(FAILURE_LOG_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(instance.root_directory) / "mp_pipelines" / "failed_runs.jsonl"


def record_failure(context: dg.RunFailureSensorContext) -> dict[str, Any] | None:
    """Log, observe and append the failure of a workflow run; None for runs that are not workflow runs."""
    run = context.dagster_run
    if WORKFLOW_TAG not in run.tags:
        return None
    record = failure_record(run, context.get_step_failure_events(), context.failure_event)
    workflow = record["workflow"]
    if record["failures"]:
        for failure in record["failures"]:
            context.log.warning(f"run {run.run_id} of workflow {workflow} failed in task {failure['task']} "
                                f"(step {failure['step']}): {failure['error']}")
            context.instance.report_runless_asset_event(dg.AssetObservation(
                asset_key=dg.AssetKey([workflow, failure["task"]]),
                partition=record["partition"],
                metadata={"status": "failed", "run_id": run.run_id, "step": failure["step"],
                          "error": dg.MetadataValue.text(failure["error"])},
            ))
    else:
        context.log.warning(f"run {run.run_id} of workflow {workflow} failed before any task ran: "
                            f"{record['run_error']}")
    path = failure_log_path(context.instance)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as exc:  # the log and the observation above still record it
        context.log.error(f"cannot append the failure of run {run.run_id} to {path}: {exc}")
    return record


def build_failure_sensor(name: str = FAILURE_SENSOR_NAME, jobs: list[Any] | None = None) -> dg.SensorDefinition:
    """`mp_pipelines_run_failure_sensor`, running by default, watching every job of this code location; or, named
    `name`, only `jobs` (jobs or asset jobs): one per workflow of a `dg` project, whose components each bring one."""

    @dg.run_failure_sensor(name=name, default_status=dg.DefaultSensorStatus.RUNNING, monitored_jobs=jobs,
                           description="Records each failed workflow run: the failing task and its error, as a "
                                       "log line, an asset observation and a line in failed_runs.jsonl.")
    def failure_sensor(context: dg.RunFailureSensorContext) -> None:
        record_failure(context)

    return failure_sensor
