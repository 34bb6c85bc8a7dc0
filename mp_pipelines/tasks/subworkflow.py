"""A called workflow run inside one step: per item of a `for_each` call, its tasks in dependency order.

Each callee task goes through the same call path as any task (cache, limits, the run's one budget account,
retries), under the caller fan-out's breadth; its fan-outs run their items concurrently like a shard. The item's
record keeps the callee's result and every callee task's answer. No Dagster here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mp_pipelines.calls.call import CallScope
from mp_pipelines.calls.deadline import TaskTimeout
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import ChatModel, LLMError
from mp_pipelines.spec.graph import for_each_source, topological_order
from mp_pipelines.spec.inputs import coerce_input, load_table
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.subworkflows import is_template, result_steps, single_expression
from mp_pipelines.spec.templates import TemplateError, render, value_of
from mp_pipelines.tasks.runner import arun_task, build_context, condition_holds, records
from mp_pipelines.tasks.shards import STOPS_THE_FAN_OUT, ItemRecord, raise_item_error, run_shard

# (workflow, task) → the scope its calls run under; made by the caller's step (factory/).
ScopeFor = Callable[[WorkflowSpec, TaskSpec], CallScope]
# (input name, path, folder relative paths resolve against) → the checked real path of a table input, or an error
# (the input-path checks).
CheckPath = Callable[[str, str, "str | None"], str]


class CalleeFailed(Exception):
    """A task of a called workflow failed in a way its item cannot recover from (an item of its fan-out, a
    template); `kind` as for an LLMError."""

    def __init__(self, message: str, kind: str = "callee", usage: Usage | None = None) -> None:
        super().__init__(message)
        self.kind, self.usage = kind, usage or Usage()


def call_inputs(caller: WorkflowSpec, task: TaskSpec, callee: WorkflowSpec, context: Mapping[str, Any],
                check_path: CheckPath | None = None) -> dict[str, Any]:
    """The callee's inputs for one call: each of the task's `inputs:` rendered in `context` (a value written as one
    `{{ expression }}` keeps its type, other templates give text), typed by the callee's declarations, defaults
    for the rest; table paths pass `check_path`. ValueError naming the task and input on a bad value."""
    values: dict[str, Any] = {}
    for name, declared in callee.inputs.items():
        raw, folder = declared.default, callee.folder  # a default's relative path is the callee file's
        if name in task.inputs:
            raw, folder = task.inputs[name], caller.folder
        try:
            expression = single_expression(raw)
            if expression is not None:
                raw = value_of(expression, dict(context))
            elif is_template(raw):
                raw = render(raw, dict(context))
            value = coerce_input(declared.type, raw, name)
            if declared.type == "table" and check_path is not None:
                value = check_path(name, value, folder)
        except (TemplateError, ValueError) as exc:
            raise ValueError(f"task {task.name}: input {name!r} of workflow {callee.name!r}: {exc}") from None
        values[name] = value
    return values


@dataclass
class CalleeRun:
    """What one run of a callee gave: its result, every task's answer, and what its calls cost."""

    result: Any = None
    steps: dict[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    models: set[str] = field(default_factory=set)


def callee_result(callee: WorkflowSpec, outputs: Mapping[str, Any]) -> Any:
    """The callee's result from its steps' outputs: its `outputs:` map, else its single final step's output."""
    chosen = result_steps(callee)
    if isinstance(chosen, dict):
        return {name: outputs.get(step) for name, step in chosen.items()}
    return outputs.get(chosen) if chosen is not None else None


async def arun_callee(model: ChatModel, callee: WorkflowSpec, inputs: Mapping[str, Any], *, scope_for: ScopeFor,
                      label: str, log: logging.Logger | Any, check_path: CheckPath | None = None) -> CalleeRun:
    """Every task of `callee` in dependency order with `inputs`; LLMError, TaskTimeout, TemplateError or
    CalleeFailed when one fails. Nested calls run the same way (their depth is bounded by the spec checks)."""
    run = CalleeRun()
    outputs: dict[str, Any] = {}
    steps = {step.name: step for step in callee.tasks}
    for name in topological_order(callee):
        step = steps[name]
        if isinstance(step, LoopSpec):
            raise CalleeFailed(f"{label}: workflow {callee.name!r} has loop {name!r}, which cannot run inside "
                               "another task's step; call it without for_each", kind="bad_request")
        where = f"{label}.{name}"
        context = build_context(callee, inputs, outputs)
        if step.for_each is None and not condition_holds(step, context):
            outputs[name] = None
            continue
        if step.workflow is not None:
            value = await _run_nested(model, callee, step, context, inputs, outputs, run, scope_for=scope_for,
                                      label=where, log=log, check_path=check_path)
        elif step.for_each is not None:
            value = await _run_fan_out(model, callee, step, context, inputs, outputs, run, scope=scope_for(callee, step),
                                       label=where, log=log)
        else:
            answer = await arun_task(model, callee, step, context, label=where, scope=scope_for(callee, step))
            run.usage = run.usage + answer.usage
            run.models.add(answer.model)
            value = answer.output
        outputs[name] = value
        run.steps[name] = value
    run.result = callee_result(callee, outputs)
    return run


def _items(spec: WorkflowSpec, task: TaskSpec, inputs: Mapping[str, Any], outputs: Mapping[str, Any],
           label: str) -> tuple[list[Any], bool]:
    found = for_each_source(task)
    assert found is not None
    kind, name = found
    value = inputs.get(name) if kind == "input" else outputs.get(name)
    if kind == "input" and spec.inputs[name].type == "table":
        value = records(load_table(value, name=name, max_rows=spec.max_items))
        return value, True
    if not isinstance(value, list):
        raise CalleeFailed(f"{label}: for_each over {task.for_each} needs a list, but it is a {type(value).__name__}",
                           kind="bad_request")
    if len(value) > spec.max_items:
        raise CalleeFailed(f"{label}: for_each over {task.for_each} has {len(value)} items, more than the workflow's "
                           f"max_items ({spec.max_items})", kind="bad_request")
    return value, False


async def _run_fan_out(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any],
                       inputs: Mapping[str, Any], outputs: Mapping[str, Any], run: CalleeRun, *, scope: CallScope,
                       label: str, log: Any) -> list[Any]:
    items, is_table = _items(spec, task, inputs, outputs, label)
    found = await run_shard(model, spec, task, context, list(enumerate(items)), is_table=is_table, scope=scope,
                            deadline_of=lambda: None, log=log)
    for record in found:
        run.usage = run.usage + record.usage
        if record.model:
            run.models.add(record.model)
    stopped = [r for r in found if r.status == "stopped"]
    if stopped:
        error = LLMError(stopped[0].error or "budget reached", kind="budget")
        error.usage = Usage()
        raise error
    policy, _ = spec.failure_policy(task)
    failed = [r for r in found if r.status == "failed"]
    if failed and (policy == "fail" or len(failed) == len(found)):
        raise CalleeFailed(f"{label}: {len(failed)} of {len(found)} item(s) failed: [{failed[0].index}] "
                           f"{failed[0].error}", kind=failed[0].error_kind or "callee")
    return [r.output for r in found if r.status == "success"]


async def _run_nested(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any],
                      inputs: Mapping[str, Any], outputs: Mapping[str, Any], run: CalleeRun, *, scope_for: ScopeFor,
                      label: str, log: Any, check_path: CheckPath | None) -> Any:
    assert task.workflow is not None
    callee = spec.callee(task.workflow)
    if task.for_each is None:
        values = [(None, context)]
    else:
        items, _ = _items(spec, task, inputs, outputs, label)
        values = [(index, {**context, "item": item, "item_index": index}) for index, item in enumerate(items)]
    results = []
    for index, item_context in values:
        try:
            callee_inputs = call_inputs(spec, task, callee, item_context, check_path)
        except ValueError as exc:
            raise CalleeFailed(f"{label}: {exc}", kind="bad_request") from None
        inner = await arun_callee(model, callee, callee_inputs, scope_for=scope_for,
                                  label=label if index is None else f"{label}[{index}]", log=log, check_path=check_path)
        run.usage = run.usage + inner.usage
        run.models |= inner.models
        for name, value in inner.steps.items():
            run.steps[f"{task.name}.{name}" if index is None else f"{task.name}[{index}].{name}"] = value
        results.append(inner.result)
    return results[0] if task.for_each is None else results


async def run_call_item(model: ChatModel, caller: WorkflowSpec, task: TaskSpec, base_context: Mapping[str, Any],
                        index: int, item: Any, *, scope_for: ScopeFor, row: Any, log: Any,
                        check_path: CheckPath | None = None) -> ItemRecord:
    """One item of a `for_each` call: its `when`, the callee's inputs, the callee's tasks; a recorded failure
    rather than an exception, except errors in STOPS_THE_FAN_OUT."""
    assert task.workflow is not None
    callee = caller.callee(task.workflow)
    context = {**base_context, "item": item, "item_index": index}
    record = ItemRecord(index=index, status="failed", row=row, attempts=1)
    label = f"{task.name}[{index}]"
    try:
        if task.when is not None and not condition_holds(task, context):
            record.status = "skipped"
            return record
        inputs = call_inputs(caller, task, callee, context, check_path)
        run = await arun_callee(model, callee, inputs, scope_for=scope_for, label=label, log=log,
                                check_path=check_path)
    except TemplateError as exc:
        record.error, record.error_kind = f"template error: {exc}", "template"
        return record
    except ValueError as exc:
        record.error, record.error_kind = str(exc), "bad_request"
        return record
    except (LLMError, TaskTimeout, CalleeFailed) as exc:
        if isinstance(exc, LLMError) and exc.kind in STOPS_THE_FAN_OUT:
            raise
        kind = exc.kind if isinstance(exc, (LLMError, CalleeFailed)) else "timeout"
        record.error, record.error_kind = str(exc), kind
        record.status = "stopped" if kind == "budget" else "failed"
        record.retryable = isinstance(exc, LLMError) and exc.retryable
        record.usage = record.usage + (getattr(exc, "usage", None) or Usage())
        return record
    record.status, record.output, record.steps = "success", run.result, run.steps
    record.usage = run.usage
    record.model = ", ".join(sorted(run.models)) or None
    return record


async def run_call_shard(model: ChatModel, caller: WorkflowSpec, task: TaskSpec, base_context: Mapping[str, Any],
                         items: list[tuple[int, Any]], *, is_table: bool, scope_for: ScopeFor, log: Any,
                         check_path: CheckPath | None = None) -> list[ItemRecord]:
    """Every item of a shard of a `for_each` call concurrently (breadth and limits bound the calls in flight)."""
    try:
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(run_call_item(model, caller, task, base_context, index, item,
                                                       scope_for=scope_for, row=item if is_table else None, log=log,
                                                       check_path=check_path))
                       for index, item in items]
    except BaseExceptionGroup as group_error:
        raise_item_error(group_error)
    return [t.result() for t in running]
