"""Sub-workflows in the job: a task that runs another workflow (`workflow:`).

Run once, the callee is a nested graph named after the call (`<caller>__<task>`, node `<task>`): an `inputs` op
that renders the call's `inputs:`, the callee's own steps, and a `call__result` op. Its tasks' assets are
`[caller, task, callee_task]`, the call's own asset `[caller, task]` is the callee's result (`outputs:` or its
final task). Run per item (`for_each`), the callee's tasks run inside each shard step of the caller's fan-out
(tasks/subworkflow.py): Dagster allows no dynamic output inside another, and a callee may fan out itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from mp_pipelines.calls.call import CallScope
from mp_pipelines.calls.loop import shared_loop
from mp_pipelines.factory.names import CALL_RESULT_OP, INPUTS_OP, WORKFLOW_TAG
from mp_pipelines.factory.ops import (
    Node,
    asset_key,
    call_scope,
    chat_model,
    check_condition,
    checked_table_path,
    failure_metadata,
    make_op,
    materialization,
    run_is_stopping,
    settle_writes,
    split_inputs,
    upstream_ins,
)
from mp_pipelines.factory.partitions import inbox_partitions_def
from mp_pipelines.llm.types import LLMError
from mp_pipelines.spec.models import RESERVED_SEPARATOR, TaskSpec, WorkflowSpec
from mp_pipelines.spec.subworkflows import result_steps
from mp_pipelines.tasks.runner import build_context, preview
from mp_pipelines.tasks.shards import ItemRecord
from mp_pipelines.tasks.subworkflow import call_inputs, run_call_shard

RESULT_OP = CALL_RESULT_OP  # inside a call's graph; "__" keeps it apart from task names

ComposeSteps = Callable[[WorkflowSpec, dict[str, Any], str], dict[str, Any]]


def called_spec(caller: WorkflowSpec, task: TaskSpec) -> WorkflowSpec:
    """The workflow `task` runs, as run there: assets under [caller, task, ...], the caller's budget and limits."""
    assert task.workflow is not None
    return caller.callee(task.workflow).called_at((*caller.asset_prefix, task.name), caller)


def _path_check(callee: WorkflowSpec, caller_dir: Path | None) -> Callable[[str, str, str | None], str]:
    """The input-path check of a table input passed to `callee` (as for any input: inside the allowed roots),
    relative paths resolving against `folder` (the caller's for values it passes, the callee's for defaults)."""
    def check(name: str, path: str, folder: str | None) -> str:
        base = Path(folder) if folder else caller_dir
        return checked_table_path(callee, name, path, base)
    return check


def build_call_inputs_op(caller: WorkflowSpec, task: TaskSpec, callee: WorkflowSpec, upstream: list[str],
                         base_dir: Path | None = None) -> Node:
    """The call's first op: its `inputs:` rendered and typed by the callee's inputs (table paths checked as any
    input's); nothing when the task's `when` is false, which skips the whole call."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        template_context = build_context(caller, workflow_inputs, values)
        if not check_condition(task, template_context, task.name):
            context.log.info(f"{task.name}: skipped because `when: {task.when}` is false")
            return
        try:
            found = call_inputs(caller, task, callee, template_context, _path_check(callee, base_dir))
        except ValueError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        yield dg.Output(found, metadata={name: dg.MetadataValue.text(preview(v, 200)) for name, v in found.items()})

    return make_op(callee, INPUTS_OP, compute, ins=upstream_ins(upstream),
                   outs={"result": dg.Out(dg.Any, is_required=task.when is None)},
                   description=f"Inputs of workflow {callee.name}, as task {task.name} of {caller.name} passes them.",
                   tags={WORKFLOW_TAG: caller.name})


def build_call_result_op(caller: WorkflowSpec, task: TaskSpec, callee: WorkflowSpec) -> tuple[Node, list[str]]:
    """The call's last op, materialising [caller, task] as the callee's result; and the steps it reads."""
    chosen = result_steps(callee)
    names = list(dict.fromkeys(chosen.values())) if isinstance(chosen, dict) else [chosen]

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        value = {name: inputs[step] for name, step in chosen.items()} if isinstance(chosen, dict) else inputs[chosen]
        yield materialization(context, caller, task.name, value, {"workflow": callee.name})
        yield dg.Output(value, metadata={"workflow": callee.name})

    op = make_op(callee, RESULT_OP, compute, ins={name: dg.In(dg.Any) for name in names},
                 description=f"Result of workflow {callee.name} for task {task.name} of {caller.name}.",
                 tags={WORKFLOW_TAG: caller.name})
    return op, names


def compose_call(caller: WorkflowSpec, task: TaskSpec, upstream: list[str], handles: Mapping[str, Any],
                 provider: str, compose_steps: ComposeSteps) -> Any:
    """A workflow run once: a nested graph node `task` fed by `handles` (the caller's inputs and upstream steps)."""
    callee = called_spec(caller, task)
    inputs_op = build_call_inputs_op(caller, task, callee, upstream)
    result_op, result_names = build_call_result_op(caller, task, callee)

    def body(**graph_inputs: Any) -> Any:
        inner = compose_steps(callee, {INPUTS_OP: inputs_op(**graph_inputs)}, provider)
        return result_op(**{name: inner[name] for name in result_names})

    graph = dg.graph(name=RESERVED_SEPARATOR.join(callee.asset_prefix),
                     description=task.description or f"Workflow {callee.name}, run by task {task.name}.",
                     ins={name: dg.GraphIn() for name in handles}, out=dg.GraphOut())(body)
    return graph.alias(task.name)(**handles)


def run_call_items(context: dg.OpExecutionContext, caller: WorkflowSpec, task: TaskSpec,
                   workflow_inputs: Mapping[str, Any], values: Mapping[str, Any], items: list[tuple[int, Any]],
                   is_table: bool, breadth: int) -> list[ItemRecord]:
    """A shard of a `for_each` call: the callee's tasks for each item, inside this step, under the caller
    fan-out's breadth and the run's limits, budget and cache."""
    callee = called_spec(caller, task)
    scopes: dict[tuple[str, str], CallScope] = {}
    opened: list[CallScope] = []

    def scope_for(spec: WorkflowSpec, inner: TaskSpec) -> CallScope:
        key = (spec.name, inner.name)
        if key not in scopes:
            # The run's budget and limits are the caller's; the callee's tasks keep their own cache and retries.
            run_spec = spec.model_copy(update={"budget": caller.budget, "limits": caller.limits})
            scopes[key] = call_scope(context, run_spec, inner, fanout=task.name, breadth=breadth)
            opened.append(scopes[key])
        return scopes[key]

    base = build_context(caller, workflow_inputs, values)
    coro = run_call_shard(chat_model(context), caller, task, base, items, is_table=is_table, scope_for=scope_for,
                          log=context.log, check_path=_path_check(callee, None))
    try:
        outcome = shared_loop().run(coro, should_stop=lambda: run_is_stopping(context))
    except LLMError as exc:
        raise dg.Failure(f"task {task.name}: {exc}", metadata=failure_metadata(exc), allow_retries=False) from None
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        if isinstance(first, LLMError):
            raise dg.Failure(f"task {task.name}: {first}", metadata=failure_metadata(first),
                             allow_retries=False) from None
        raise
    for scope in opened:
        settle_writes(scope)
    for record in outcome:
        record.run_id = context.run_id
    return outcome



def call_asset_specs(caller: WorkflowSpec, task: TaskSpec, upstream: list[str], build_specs: Callable[..., list[Any]],
                     *, outside: tuple[dg.AssetKey, ...], root: WorkflowSpec | None) -> list[dg.AssetSpec]:
    """The assets of a workflow run once by `task`: its tasks under [caller, task, ...] reading what the call
    passes in (the caller's upstream steps), and [caller, task] reading the callee's result steps."""
    callee = called_spec(caller, task)
    passed_in = tuple(asset_key(caller, name) for name in upstream) or outside
    chosen = result_steps(callee)
    results = list(dict.fromkeys(chosen.values())) if isinstance(chosen, dict) else [chosen]
    inner = build_specs(callee, outside=passed_in, root=root or caller)
    own = dg.AssetSpec(
        key=asset_key(caller, task.name), deps=[asset_key(callee, name) for name in results],
        description=task.description or f"Result of workflow {callee.name}.", group_name=(root or caller).name,
        kinds={"llm"}, tags={WORKFLOW_TAG: (root or caller).name},
        metadata={"workflow": caller.name, "runs_workflow": callee.name},
        partitions_def=inbox_partitions_def(root or caller))
    return [*inner, own]
