"""What happened in a run, per task: status, output and model usage, read from Dagster's event log."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from mp_pipelines.calls.usage import Usage
from mp_pipelines.factory.names import (
    CALL_RESULT_OP,
    ITEM_RECORDS,
    body_step,
    call_step,
    collect_step,
    is_mapped_step,
    items_step,
    loop_step,
    mapped_step,
    publish_step,
    task_step,
)
from mp_pipelines.spec.graph import loop_iterations
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.tasks.runner import records
from mp_pipelines.telemetry.tally import TALLY_METADATA_KEY

_STEP_EVENTS = {
    dg.DagsterEventType.STEP_START,
    dg.DagsterEventType.STEP_OUTPUT,
    dg.DagsterEventType.STEP_SUCCESS,
    dg.DagsterEventType.STEP_FAILURE,
    dg.DagsterEventType.STEP_SKIPPED,
    dg.DagsterEventType.STEP_UP_FOR_RETRY,
}


@dataclass
class StepState:
    """One Dagster step as the event log tells it."""

    status: str = "not_run"  # running | success | failed | skipped | not_run | retrying
    has_output: bool = False
    outputs: set[str] = field(default_factory=set)  # names of the outputs it yielded
    error: str | None = None
    usage: Usage = field(default_factory=Usage)  # calls of its outputs, and of failed attempts that got answers
    failed_items: list[dict[str, Any]] = field(default_factory=list)  # fan-out items left out (on_item_failure: skip)
    models: dict[str, int] = field(default_factory=dict)  # model that answered → calls (fallbacks, providers)
    tallied: Usage | None = None  # every call of a failed attempt, from its `mp/calls` tally (telemetry/tally.py)


def step_states(instance: dg.DagsterInstance, run_id: str) -> dict[str, StepState]:
    """Step key → state, from the run's step events."""
    states: dict[str, StepState] = {}
    for record in instance.get_records_for_run(run_id, of_type=_STEP_EVENTS, limit=1_000_000).records:
        event = record.event_log_entry.dagster_event
        if event is None or event.step_key is None:
            continue
        state = states.setdefault(event.step_key, StepState())
        kind = event.event_type
        if kind == dg.DagsterEventType.STEP_START:
            state.status = "running"
        elif kind == dg.DagsterEventType.STEP_UP_FOR_RETRY:
            state.status = "retrying"
        elif kind == dg.DagsterEventType.STEP_OUTPUT:
            state.has_output = True
            state.outputs.add(event.event_specific_data.step_output_handle.output_name)
            metadata = event.event_specific_data.metadata
            state.usage = state.usage + Usage.from_metadata(metadata)
            for model, calls in dict(getattr(metadata.get("models"), "value", None) or {}).items():
                state.models[model] = state.models.get(model, 0) + int(calls)
            if "failed" in metadata:
                state.failed_items = list(metadata["failed"].value)
        elif kind == dg.DagsterEventType.STEP_SUCCESS:
            state.status = "success"
        elif kind == dg.DagsterEventType.STEP_SKIPPED:
            state.status = "skipped"
        elif kind == dg.DagsterEventType.STEP_FAILURE:
            state.status = "failed"
            error, user_failure = event.step_failure_data.error, event.step_failure_data.user_failure_data
            state.error = _error_text(error, user_failure)
            if user_failure is not None:  # answers a failed attempt got were paid for
                state.usage = state.usage + Usage.from_metadata(user_failure.metadata)
                tally = getattr(user_failure.metadata.get(TALLY_METADATA_KEY), "value", None)
                if isinstance(tally, dict):
                    state.tallied = (state.tallied or Usage()) + tally_usage(tally)
                if "failed" in user_failure.metadata:
                    state.failed_items = list(user_failure.metadata["failed"].value)
    return states


def tally_usage(tally: dict[str, Any]) -> Usage:
    """The calls, cache hits, tokens and cost of a step's `mp/calls` tally, over its models."""
    usage = Usage()
    for row in tally.get("models") or []:
        usage = usage + Usage(calls=int(row.get("calls", 0)), cache_hits=int(row.get("cache_hits", 0)),
                              prompt_tokens=int(row.get("prompt_tokens", 0)),
                              completion_tokens=int(row.get("completion_tokens", 0)),
                              cost_usd=float(row.get("cost_usd", 0.0)), rate_limited=int(row.get("rate_limited", 0)))
    return usage


def family_step_states(instance: dg.DagsterInstance, run_id: str, own: dict[str, StepState]) -> dict[str, StepState]:
    """Step states of a run (`own`, already read) and the runs it re-executes: a step keeps the state of the
    latest run that ran it."""
    ancestors = []
    run = instance.get_run_by_id(run_id)
    while run is not None and run.parent_run_id and len(ancestors) < 100:
        ancestors.append(run.parent_run_id)
        run = instance.get_run_by_id(run.parent_run_id)
    states: dict[str, StepState] = {}
    for ancestor in reversed(ancestors):
        states.update(step_states(instance, ancestor))
    return {**states, **own}


def _error_text(error: Any, user_failure: Any) -> str:
    if user_failure is not None and user_failure.description:
        return user_failure.description
    if error is None:
        return "unknown error"
    cause = error.cause or error
    return cause.message.strip()


def task_steps(spec: WorkflowSpec, step: TaskSpec | LoopSpec) -> dict[str, list[str]]:
    """Task name → the step keys (prefixes for mapped steps) whose states make up its status."""
    if isinstance(step, LoopSpec):
        count = loop_iterations(spec, step)
        keys = {task.name: [body_step(spec.name, step.name, task.name, i) for i in range(1, count + 1)]
                for task in step.tasks}
        # The loop's own step runs only once an iteration ends it, so the loop's status and error are its body's
        # too: a budget stop inside the loop fails the loop, with the reason.
        return {step.name: [*(key for body in keys.values() for key in body), loop_step(spec.name, step.name)],
                **keys}
    if step.for_each:
        return {step.name: [items_step(spec.name, step.name), mapped_step(spec.name, step.name, "")[:-1],
                            collect_step(spec.name, step.name), publish_step(spec.name, step.name)]}
    if step.workflow is not None:  # a graph: every step inside it, its result step last
        return {step.name: [call_step(spec.name, step.name, ""), call_step(spec.name, step.name, CALL_RESULT_OP)]}
    return {step.name: [task_step(spec.name, step.name)]}


def _matching(states: dict[str, StepState], keys: list[str]) -> list[StepState]:
    found = []
    for key in keys:
        if key.endswith(("[", ".")):  # every mapped step of a fan-out, every step of a called workflow's graph
            found.extend(state for step_key, state in states.items() if step_key.startswith(key))
        elif key in states:
            found.append(states[key])
    return found


def task_status(states: list[StepState], *, last_key_state: StepState | None) -> str:
    """One word for a task made of several steps."""
    if any(s.status == "failed" for s in states):
        return "failed"
    if any(s.status in ("running", "retrying") for s in states):
        return "running"
    if last_key_state is None or last_key_state.status == "not_run":
        return "skipped" if any(s.status == "skipped" for s in states) else "not_run"
    if last_key_state.status == "success" and not last_key_state.has_output:
        return "skipped"  # its `when` was false
    return last_key_state.status


def summarize_tasks(spec: WorkflowSpec, states: dict[str, StepState]) -> dict[str, dict[str, Any]]:
    """Task name → {status, error, usage} for every task and loop of the workflow."""
    summary = {}
    for step in spec.tasks:
        for name, keys in task_steps(spec, step).items():
            summary[name] = _summarize_task(step, name, _matching(states, keys), states.get(keys[-1]))
    return summary


def _summarize_task(step: TaskSpec | LoopSpec, name: str, found: list[StepState],
                    last_key: StepState | None) -> dict[str, Any]:
    """{status, error, usage, failed_items?} of task `name` of `step` from the states of its steps."""
    loop = isinstance(step, LoopSpec)
    last = last_key
    if loop and name != step.name:  # a body task: its latest iteration that ran
        ran = [s for s in found if s.status != "not_run"]
        last = next((s for s in reversed(found) if s.status == "success"), ran[-1] if ran else None)
    # A loop's usage is its own step's: its body tasks report theirs.
    counted = ([last_key] if last_key else []) if loop and name == step.name else found
    errors = [s.error for s in found if s.error]
    task = {"status": task_status(found, last_key_state=last), "error": errors[0] if errors else None,
            "usage": sum((s.usage for s in counted), Usage())}
    models: dict[str, int] = {}
    for state in counted:
        for model, calls in state.models.items():
            models[model] = models.get(model, 0) + calls
    if models:
        task["models"] = models
    failed_items = [item for s in found for item in s.failed_items]
    if failed_items:
        task["failed_items"] = failed_items
    return task


def run_usage(states: dict[str, StepState]) -> Usage:
    """Every call the run made to the model (successful steps' outputs)."""
    return sum((s.usage for s in states.values()), Usage())


class RunValues:
    """What a finished run stored, read through its job's IO manager (`StepStorage`): step outputs of the run, and
    task assets as this run (or, for a resume, the run it re-executes) materialized them, not a later run's.

    The IO manager is set up once for all reads, and the run's own context is not re-entered: that would set up
    every resource of the run again (the model, the budget) and log it in the finished run."""

    def __init__(self, result: dg.ExecuteJobResult, instance: dg.DagsterInstance) -> None:
        self.result = result
        self.instance = instance
        self._stack = contextlib.ExitStack()
        self._resources = self._stack.enter_context(dg.build_resources(
            {"io_manager": result.job_def.resource_defs["io_manager"]}, instance=instance))

    def __enter__(self) -> RunValues:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def output(self, step_key: str, name: str) -> Any:
        """Output `name` of step `step_key` of this run; FileNotFoundError when the run stored none."""
        return self._load(dg.build_output_context(run_id=self.result.run_id, step_key=step_key, name=name,
                                                  resources=self._resources, instance=self.instance), None)

    def asset(self, spec: WorkflowSpec, name: str) -> Any:
        """The value of the asset of task or loop `name` that this run, or the run it resumes, materialized (the
        asset's latest value when none did)."""
        from mp_pipelines.factory.ops import asset_key

        key = asset_key(spec, name)
        run_id, step = _materialized_by(self.result, key, self.instance)
        loop = any(isinstance(s, LoopSpec) and s.name == name for s in spec.tasks)  # a loop's outputs are its assets
        return self._load(dg.build_output_context(asset_key=key, run_id=run_id, step_key=step,
                                                  name=name if loop else "result", resources=self._resources,
                                                  instance=self.instance), key)

    def _load(self, upstream: dg.OutputContext, key: dg.AssetKey | None) -> Any:
        """(`build_input_context` would build resources of its own, on a throw-away in-memory instance.)"""
        context = dg.InputContext(asset_key=key, upstream_output=upstream, resources=self._resources,
                                  instance=self.instance, log_manager=dg.DagsterLogManager.create(loggers=[]))
        return self._resources.io_manager.load_input(context)


def task_output(values: RunValues, spec: WorkflowSpec, name: str, states: dict[str, StepState]) -> Any:
    """A finished task's output as JSON-ready data; fan-outs give item results in input order."""
    step = next((s for s in spec.tasks if s.name == name), None)
    if step is None:  # a loop body task: its latest output is in the loop's result
        loop = next(s for s in spec.tasks if isinstance(s, LoopSpec) and name in {t.name for t in s.tasks})
        result_step = loop_step(spec.name, loop.name)
        if result_step in states and states[result_step].status == "success":
            return values.asset(spec, loop.name).get(name)
        return _latest_of_stopped_loop(values, spec, loop, states).get(name)
    if isinstance(step, TaskSpec) and step.for_each:
        if not any(is_mapped_step(key, spec.name, name) for key in states):
            return []  # an empty fan-out ran no item step
        item_records = values.output(collect_step(spec.name, name), ITEM_RECORDS)
        return list(item_records[item_records["status"].isin(["success", "skipped"])]["output"])
    value = values.asset(spec, name)
    return records(value) if hasattr(value, "columns") else value


def _materialized_by(result: dg.ExecuteJobResult, key: dg.AssetKey,
                     instance: dg.DagsterInstance) -> tuple[str | None, str | None]:
    """The run and step that materialized `key` for this run: the run itself, else the nearest run it re-executes
    (a resume runs only what failed); (None, None) when none did."""
    step = next((e.step_key for e in result.get_asset_materialization_events() if e.asset_key == key), None)
    if step is not None:
        return result.run_id, step
    run = instance.get_run_by_id(result.run_id)
    while run is not None and run.parent_run_id:
        records = instance.get_records_for_run(run.parent_run_id,
                                               of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        step = next((r.event_log_entry.step_key for r in records
                     if r.event_log_entry.asset_materialization.asset_key == key), None)
        if step is not None:
            return run.parent_run_id, step
        run = instance.get_run_by_id(run.parent_run_id)
    return None, None


def _latest_of_stopped_loop(values: RunValues, spec: WorkflowSpec, loop: LoopSpec,
                            states: dict[str, StepState]) -> dict[str, Any]:
    """Body task → latest output of a loop stopped before its end (a budget stop, a failed body task): the loop
    state that the last body step to finish passed on (`latest`, see factory/loops.py)."""
    for iteration in range(loop_iterations(spec, loop), 0, -1):
        for task in reversed(loop.tasks):
            key = body_step(spec.name, loop.name, task.name, iteration)
            state = states.get(key)
            if state is not None and state.status == "success" and state.outputs:
                output = "next" if "next" in state.outputs else "done"
                return values.output(key, output)["latest"]
    return {}
