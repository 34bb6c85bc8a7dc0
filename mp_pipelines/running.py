"""Run a workflow's job through Dagster from Python or the CLI, with progress and a result summary."""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from mp_pipelines.execution.runner import preview
from mp_pipelines.execution.usage import Usage
from mp_pipelines.factory.ops import INPUTS_OP
from mp_pipelines.reporting import run_usage, step_states, summarize_tasks, task_output
from mp_pipelines.spec.graph import topological_order
from mp_pipelines.spec.models import WorkflowSpec

LOCAL_HOME = Path(".mp_pipelines") / "dagster_home"
RUN_TOKEN_TAG = "mp_pipelines/cli_token"
_POLL_SECONDS = 0.25


def local_instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, else a persistent one under ./.mp_pipelines/dagster_home."""
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    home = (Path.cwd() / LOCAL_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False},
                                                               "python_logs": {"python_log_level": "INFO"}})


@dataclass
class RunOutcome:
    """A finished run: its status, each task's status and output, and the model usage."""

    run_id: str
    status: str
    success: bool
    tasks: dict[str, dict[str, Any]]
    usage: Usage
    provider: str
    final_task: str | None = None
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        tasks = {name: {k: v for k, v in task.items() if k != "usage"} for name, task in self.tasks.items()}
        return {"run_id": self.run_id, "status": self.status, "provider": self.provider, "tasks": tasks,
                "usage": {"calls": self.usage.calls, "prompt_tokens": self.usage.prompt_tokens,
                          "completion_tokens": self.usage.completion_tokens,
                          "latency_s": round(self.usage.latency_s, 3)}}

    def as_text(self) -> str:
        lines = [f"run {self.run_id}: {self.status} (provider: {self.provider})"]
        for name, task in self.tasks.items():
            usage = task["usage"]
            detail = f"{usage.calls} call(s), {usage.prompt_tokens}+{usage.completion_tokens} tokens"
            lines.append(f"  {name:<20} {task['status']:<8} {detail}")
            if task.get("error"):
                lines.append(f"      error: {task['error']}")
        lines.append(f"usage: {self.usage.calls} call(s), {self.usage.prompt_tokens} prompt + "
                     f"{self.usage.completion_tokens} completion tokens")
        if self.final_task and self.final_task in self.tasks and self.success:
            lines += ["", f"{self.final_task}:", preview(self.tasks[self.final_task].get("output"), 20_000)]
        return "\n".join(lines)


def run_config(inputs: dict[str, Any], executor: str | None = None) -> dict[str, Any]:
    """Run config for a workflow run; Dagster's console logger is kept to warnings for a readable CLI."""
    config: dict[str, Any] = {"ops": {INPUTS_OP: {"config": inputs}},
                              "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if executor:
        config["execution"] = {"config": {executor: {}}}
    return config


def run_workflow(spec: WorkflowSpec, inputs: dict[str, Any], *, source: str | None = None,
                 executor: str | None = None, instance: dg.DagsterInstance | None = None,
                 progress: Callable[[str], None] | None = None) -> RunOutcome:
    """Execute the workflow's job with its own executor and summarize the finished run."""
    from mp_pipelines.definitions import provider_name

    own_instance = instance is None
    instance = instance or local_instance()
    job = dg.build_reconstructable_job("mp_pipelines.definitions", "get_job",
                                       reconstructable_args=(spec.name, source))
    token = uuid.uuid4().hex
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(instance, token, done, progress), daemon=True)
    if progress:
        watcher.start()
    try:
        with dg.execute_job(job, instance=instance, run_config=run_config(inputs, executor),
                            tags={RUN_TOKEN_TAG: token}, raise_on_error=False) as result:
            done.set()
            if progress:
                watcher.join(timeout=5)
            return summarize(result, spec, instance, provider_name())
    finally:
        done.set()
        if own_instance:
            instance.dispose()


def summarize(result: dg.ExecuteJobResult, spec: WorkflowSpec, instance: dg.DagsterInstance,
              provider: str) -> RunOutcome:
    """RunOutcome of a finished job result."""
    states = step_states(instance, result.run_id)
    tasks = summarize_tasks(spec, states)
    for name, task in tasks.items():
        task["output"] = None
        if task["status"] == "success":
            try:
                task["output"] = task_output(result, spec, name, states)
            except Exception as exc:  # an output the IO manager cannot load is reported, not fatal
                task["output"] = None
                task["error"] = f"output could not be loaded: {exc}"
    order = topological_order(spec)
    run = instance.get_run_by_id(result.run_id)
    status = run.status.value.lower() if run else ("success" if result.success else "failure")
    return RunOutcome(result.run_id, status, result.success, tasks, run_usage(states), provider,
                      final_task=order[-1] if order else None)


def _watch(instance: dg.DagsterInstance, token: str, done: threading.Event,
           progress: Callable[[str], None] | None) -> None:
    """Print step starts, successes, retries and failures as they land in the event log."""
    assert progress is not None
    run_id = None
    cursor = None
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE,
             dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_SKIPPED}
    finished = False
    while not finished:
        finished = done.wait(_POLL_SECONDS)
        if run_id is None:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_TOKEN_TAG: token}), limit=1)
            if not runs:
                continue
            run_id = runs[0].run_id
            progress(f"run {run_id} started")
        while True:
            connection = instance.get_records_for_run(run_id, cursor=cursor, of_type=kinds, limit=500)
            for record in connection.records:
                event = record.event_log_entry.dagster_event
                if event is not None and event.step_key:
                    progress(_describe(event))
            cursor = connection.cursor
            if not connection.has_more:
                break


def _describe(event: dg.DagsterEvent) -> str:
    kind = event.event_type
    if kind == dg.DagsterEventType.STEP_START:
        return f"  … {event.step_key}"
    if kind == dg.DagsterEventType.STEP_SUCCESS:
        return f"  ✓ {event.step_key}"
    if kind == dg.DagsterEventType.STEP_SKIPPED:
        return f"  - {event.step_key} skipped"
    if kind == dg.DagsterEventType.STEP_UP_FOR_RETRY:
        return f"  ↻ {event.step_key} will retry"
    return f"  ✗ {event.step_key} failed"
