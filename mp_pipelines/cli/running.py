"""Run a workflow's job through Dagster from Python or the CLI, with progress and a result summary."""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from mp_pipelines.calls.usage import Usage
from mp_pipelines.cli.check_report import attach_checks, check_evaluations, failed_check_lines
from mp_pipelines.cli.config import CLI_CONSOLE_LOG_LEVEL, run_config, with_budget
from mp_pipelines.cli.reporting import (
    RunValues,
    family_step_states,
    run_usage,
    step_states,
    summarize_tasks,
    task_output,
)
from mp_pipelines.dagster_ext.compute_logs import compute_logs_config
from mp_pipelines.dagster_ext.sqlite import pooled_storage_config
from mp_pipelines.factory.names import CHECKS_SUFFIX, RESUME_RETRY_TAG, task_of_step
from mp_pipelines.spec.graph import topological_order
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.paths import LOCAL_RUN_DIR_ENV, InputPathError, input_roots
from mp_pipelines.tasks.runner import preview

LOCAL_HOME = Path(".mp_pipelines") / "dagster_home"
QUIET_CONSOLE_LOG_LEVEL = "CRITICAL"  # a failed step's ERROR event carries its stack trace: --verbose shows it
RUN_TOKEN_TAG = "mp_pipelines/cli_token"
_POLL_SECONDS = 0.25


def local_instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, else a persistent one under ./.mp_pipelines/dagster_home.

    What the home's dagster.yaml leaves to Dagster's defaults is opened lighter, on the same files: the SQLite storage
    through `PooledSqliteStorage`, which keeps one connection per database file open instead of one per event
    (mp_pipelines/dagster_ext/sqlite.py), and the compute logs through `MirroredComputeLogManager`, which copies the
    captured output to the terminal from a thread instead of `tail` processes (dagster_ext/compute_logs.py)."""
    configured = os.environ.get("DAGSTER_HOME")
    if configured:
        home = Path(configured).expanduser().resolve()
        named = _named_settings(home) if home.is_dir() else None
        overrides = _lighter_defaults(home, named) if named is not None else {}
        if not overrides:
            return dg.DagsterInstance.get()  # Dagster's own errors and choices
        return dg.DagsterInstance.local_temp(str(home), overrides=overrides)
    home = (Path.cwd() / LOCAL_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    named = _named_settings(home)
    if named:
        # A dagster.yaml here (the one `mp-pipelines ui` writes names its storage by `env: DAGSTER_HOME`) is read as
        # the DAGSTER_HOME it is, by this process and the step processes it starts.
        os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False},
                                                               "python_logs": {"python_log_level": "INFO"},
                                                               **_lighter_defaults(home, named or set())})


_STORAGE_KEYS = ("storage", "run_storage", "event_log_storage", "schedule_storage")


def _lighter_defaults(home: Path, named: set[str]) -> dict[str, Any]:
    """Instance overrides for what the home's dagster.yaml does not choose itself (`named`: its top-level keys)."""
    overrides: dict[str, Any] = {}
    if not named & set(_STORAGE_KEYS):
        overrides["storage"] = pooled_storage_config(str(home))
    if "compute_logs" not in named:  # Dagster's default place for them: <home>/storage
        overrides["compute_logs"] = compute_logs_config(str(home / "storage"))
    return overrides


def _named_settings(home: Path) -> set[str] | None:
    """The top-level keys of the home's dagster.yaml (none without one); None when it cannot be read as a mapping
    (then Dagster reports it)."""
    import yaml

    config = home / "dagster.yaml"
    if not config.exists():
        return set()
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return set(loaded) if isinstance(loaded, dict) else None


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
    order: list[str] = field(default_factory=list)  # top-level steps in run order
    checks_usage: Usage | None = None  # the quality checks' model calls (judges), apart from the tasks'; None: no checks

    def as_json(self) -> dict[str, Any]:
        """What `run --json` prints: run id, status, provider, tasks (without per-task usage) and usage."""
        tasks = {name: {k: v for k, v in task.items() if k != "usage"} for name, task in self.tasks.items()}
        out = {"run_id": self.run_id, "status": self.status, "provider": self.provider, "tasks": tasks,
               "usage": self.usage.as_dict()}
        if self.checks_usage is not None:
            out["checks_usage"] = self.checks_usage.as_dict()
        return out

    def failure_summary(self) -> str:
        """One paragraph for a failed run: the task, the item, the reason and what to do."""
        from mp_pipelines.cli.summary import failure_summary

        return failure_summary(self.run_id, self.tasks, self.order, self.errors)

    def as_text(self) -> str:
        """What `run` prints: each task's status, usage and errors, then the final task's output."""
        lines = [f"run {self.run_id}: {self.status} (provider: {self.provider})"]
        for name, task in self.tasks.items():
            usage = task["usage"]
            lines.append(f"  {name:<20} {task['status']:<8} {_usage_text(usage)}")
            if task.get("error"):
                lines.append(f"      error: {task['error']}")
            for item in task.get("failed_items", [])[:5]:
                lines.append(f"      item {item['index']} failed after {item['attempts']} attempt(s): {item['error']}")
            lines += failed_check_lines(task)
        lines.append(f"usage: {_usage_text(self.usage)}")
        if self.checks_usage is not None and (self.checks_usage.calls or self.checks_usage.cache_hits):
            lines.append(f"checks usage (judges): {_usage_text(self.checks_usage)}")
        if self.final_task and self.final_task in self.tasks and self.success:
            lines += ["", f"{self.final_task}:", preview(self.tasks[self.final_task].get("output"), 20_000)]
        return "\n".join(lines)


def _usage_text(usage: Usage) -> str:
    """Calls, cache hits, tokens and dollars on one line."""
    hits = f", {usage.cache_hits} cache hit(s)" if usage.cache_hits else ""
    weather = f", {usage.retries} retried" if usage.retries else ""
    weather += f", {usage.rate_limited} rate-limited (429)" if usage.rate_limited else ""
    return (f"{usage.calls} call(s){hits}{weather}, {usage.prompt_tokens}+{usage.completion_tokens} tokens, "
            f"${usage.cost_usd:.4f}")


def mark_local_run() -> None:
    """Make the working folder an allowed input root of the run this process executes itself (its step processes
    inherit the environment). Only local runs come here: a webserver, daemon or code server never does, so the
    runs they start never get their own working folder as a root, whatever a run's config or tags say."""
    os.environ[LOCAL_RUN_DIR_ENV] = os.getcwd()


def run_workflow(spec: WorkflowSpec, inputs: dict[str, Any], *, source: str | None = None,
                 executor: str | None = None, instance: dg.DagsterInstance | None = None,
                 progress: Callable[[str], None] | None = None, budget: dict[str, Any] | None = None,
                 verbose: bool = False, mode: str | None = None, tags: dict[str, str] | None = None) -> RunOutcome:
    """Execute the workflow's job with its own executor and summarize the finished run (Dagster's console log
    only shows critical errors unless `verbose`); `tags` are added to the run's tags."""
    from mp_pipelines.definitions import jobs_built_once, reconstructable_job
    from mp_pipelines.llm.provider import provider_from_env

    mark_local_run()
    own_instance = instance is None
    instance = instance or local_instance()
    token = uuid.uuid4().hex
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(instance, token, done, progress), daemon=True)
    config = run_config(inputs, executor, budget, console_log_level=_console_level(verbose), mode=mode)
    try:
        with jobs_built_once():  # one build of the job for the run's four requests of it
            job = reconstructable_job(spec, source)
            refuse_inputs_outside_roots(spec, inputs, source)
            refuse_unsafe_run(spec, config, instance)
            if progress:
                watcher.start()
            # Not entered as a context: the summary reads outputs through RunValues, without setting up the run's
            # resources again.
            result = dg.execute_job(job, instance=instance, run_config=config,
                                    tags={**(tags or {}), RUN_TOKEN_TAG: token}, raise_on_error=False)
            done.set()
            if progress:
                watcher.join(timeout=5)
            return summarize(result, spec, instance, provider_from_env())
    finally:
        done.set()
        if own_instance:
            instance.dispose()


class RunRefused(RuntimeError):
    """A run must not start (its budget would not hold); the message says why and how to fix it."""


def refuse_inputs_outside_roots(spec: WorkflowSpec, inputs: dict[str, Any], source: str | None) -> None:
    """RunRefused, before the run starts, when a table input given lies outside the allowed input roots: the same
    check the run's first step makes, said as a usage error (exit 2) instead of a failed run."""
    from mp_pipelines.definitions import load_specs
    from mp_pipelines.factory.partitions import inbox_root

    origin = source or load_specs().sources.get(spec.name)  # cached: the run's job is built from the same load
    base_dir = Path(origin).parent if origin else None
    roots = input_roots(workflow_dir=base_dir, inbox=inbox_root())
    for name, input_spec in spec.inputs.items():
        value = inputs.get(name)
        if input_spec.type == "table" and isinstance(value, str):
            try:
                roots.resolve(value, what=f"input {name!r}: path {value!r}", base_dir=base_dir)
            except InputPathError as exc:
                raise RunRefused(str(exc)) from None


def refuse_unsafe_run(spec: WorkflowSpec, config: dict[str, Any], instance: dg.DagsterInstance) -> None:
    """RunRefused, before anything runs, when the run's budget could not be enforced (see `factory.ops.run_refusal`)."""
    from mp_pipelines.dagster_ext.celery import CeleryNotConfigured, broker_url
    from mp_pipelines.factory.names import executor_kind
    from mp_pipelines.factory.ops import fleet_mode, run_refusal
    from mp_pipelines.llm.resource import build_llm_resource

    try:
        fleet_mode()
        if executor_kind(config) == "celery":
            broker_url(((config.get("execution") or {}).get("config") or {}).get("celery", {}).get("broker"))
    except (CeleryNotConfigured, ValueError) as exc:
        raise RunRefused(f"workflow {spec.name}: {exc}") from None
    reason = run_refusal(spec, config, instance, build_llm_resource().default_model)
    if reason is not None:
        raise RunRefused(f"workflow {spec.name}: {reason}")


def summarize(result: dg.ExecuteJobResult, spec: WorkflowSpec, instance: dg.DagsterInstance,
              provider: str) -> RunOutcome:
    """RunOutcome of a finished job result."""
    own = step_states(instance, result.run_id)
    states = family_step_states(instance, result.run_id, own)  # a resumed run reuses its parents' finished steps
    tasks = summarize_tasks(spec, states)
    run = instance.get_run_by_id(result.run_id)
    with RunValues(result, instance) as values:
        for name, task in tasks.items():
            task["output"] = None
            if task["status"] == "success":
                try:
                    task["output"] = task_output(values, spec, name, states)
                except Exception as exc:  # an output the IO manager cannot load is reported, not fatal
                    if run is not None and run.parent_run_id and not _ran_here(name, own):
                        task["output_in_run"] = run.parent_run_id  # finished before the resume: its output is there
                    else:
                        task["error"] = f"output could not be loaded: {exc}"
    checks_usage = attach_checks(tasks, check_evaluations(instance, result.run_id, spec), spec, own)
    order = topological_order(spec)
    status = run.status.value.lower() if run else ("success" if result.success else "failure")
    task_steps = {key: state for key, state in own.items() if not key.endswith(CHECKS_SUFFIX)}
    # Steps of no task (the inputs step) that failed: the summary names them when no task failed.
    errors = [f"step {key}: {state.error}" for key, state in own.items()
              if state.status == "failed" and state.error and task_of_step(key) not in tasks
              and not key.endswith(CHECKS_SUFFIX)]
    return RunOutcome(result.run_id, status, result.success, tasks, run_usage(task_steps), provider,
                      final_task=order[-1] if order else None, errors=errors, order=order,
                      checks_usage=checks_usage if any(t.checks for t in spec.all_tasks()) else None)


def _console_level(verbose: bool) -> str:
    return CLI_CONSOLE_LOG_LEVEL if verbose else QUIET_CONSOLE_LOG_LEVEL


def _ran_here(name: str, own: dict[str, Any]) -> bool:
    """Whether any step of task `name` ran in the run whose step states are `own`."""
    return any(task_of_step(key) == name for key in own)


# Lines the call path logs as they happen (calls/retry.py, calls/fallback.py): retries, pauses after a 429 or an
# open circuit, circuits closing again, fallbacks.
CALL_PATH_NOTES = ("↻ ", "⏸ ", "▶ ", "⤳ ")


def _watch(instance: dg.DagsterInstance, token: str, done: threading.Event,
           progress: Callable[[str], None] | None) -> None:
    """Print step starts, successes, retries and failures as they land in the event log, and the call path's
    retries, pauses and fallbacks."""
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
            connection = instance.get_records_for_run(run_id, cursor=cursor, limit=500)
            for record in connection.records:
                entry = record.event_log_entry
                event = entry.dagster_event
                if event is not None and event.step_key and event.event_type in kinds:
                    progress(_describe(event))
                elif event is None and entry.user_message.startswith(CALL_PATH_NOTES):
                    progress(f"    {entry.user_message}")  # a retry, a pause or a fallback, as it happens
            cursor = connection.cursor
            if not connection.has_more:
                break


def _describe(event: dg.DagsterEvent) -> str:
    """One progress line for a step event."""
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


class ResumeError(RuntimeError):
    """A run cannot be resumed; the message says why and what to do."""


_UNFINISHED = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED,
               dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.CANCELING)


def _job_args(run: dg.DagsterRun) -> tuple[str, str | None]:
    """(workflow name, spec file) of a run, from the code pointer it was launched with."""
    origin = run.job_code_origin
    pointer = getattr(getattr(origin, "repository_origin", None), "code_pointer", None) if origin else None
    args = tuple(getattr(pointer, "reconstructable_args", ()) or ())
    if len(args) >= 2 and args[0] == run.job_name:
        return args[0], args[1]
    return run.job_name, None


def resume_run(run_id: str, *, instance: dg.DagsterInstance | None = None, force: bool = False,
               budget: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
               verbose: bool = False) -> RunOutcome:
    """Re-execute a failed run from failure: only failed and unfinished steps run again, and items whose answers
    the run family already got (its checkpoint, or the cache) make no new call.

    A run still marked as started whose process is gone (killed) needs `force`, which marks it failed first.
    """
    from mp_pipelines.definitions import jobs_built_once, load_specs, reconstructable_job
    from mp_pipelines.llm.provider import provider_from_env

    mark_local_run()
    own_instance = instance is None
    instance = instance or local_instance()
    try:
        with jobs_built_once():  # one build of the job for the run's four requests of it
            run = instance.get_run_by_id(run_id)
            if run is None:
                raise ResumeError(f"no run {run_id!r} in the Dagster instance at {instance.root_directory}")
            if run.status in _UNFINISHED:
                if not force:
                    raise ResumeError(f"run {run_id} is still {run.status.value}; if its process is gone (killed), "
                                      "pass --force to mark it failed and resume it")
                instance.report_run_failed(run, "marked failed by `mp-pipelines resume --force`: its process is gone")
            elif run.status != dg.DagsterRunStatus.FAILURE:
                raise ResumeError(f"run {run_id} ended {run.status.value}; only failed runs can be resumed")
            name, source = _job_args(run)
            loaded = load_specs(source)
            if name not in loaded.specs:
                raise ResumeError(f"run {run_id} ran workflow {name!r}, which is not loaded now")
            spec = loaded.specs[name]
            job = reconstructable_job(spec, source)
            config = with_budget(dict(run.run_config), budget)
            config["loggers"] = {"console": {"config": {"log_level": _console_level(verbose)}}}
            refuse_unsafe_run(spec, config, instance)
            token = uuid.uuid4().hex
            tags = {k: v for k, v in run.tags.items() if not k.startswith("dagster/")}
            tags |= {RUN_TOKEN_TAG: token, RESUME_RETRY_TAG: "true"}  # as Dagster's own from-failure re-execution
            if progress:
                progress(f"resuming run {run_id} of {name} from failure")
            result = dg.execute_job(job, instance=instance, run_config=config, tags=tags, raise_on_error=False,
                                    reexecution_options=dg.ReexecutionOptions.from_failure(run_id, instance))
            return summarize(result, spec, instance, provider_from_env())
    finally:
        if own_instance:
            instance.dispose()
