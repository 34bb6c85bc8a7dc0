"""Sub-workflows in the job: a task that runs another workflow (`workflow:`).

Run once, the callee is a graph-backed multi-asset `<caller>__<task>` (a collapsible subgraph in the UI): an
`inputs` op that renders the call's `inputs:`, the callee's own steps (ops, fan-out and loop graphs, nested calls),
and a `call__result` op. Its steps' assets are `[caller, <task>__<callee>, step]`; the call's own asset `[caller, task]`
is the callee's result (`outputs:` or its final step), with lineage in from what the call reads.
Run per item (`for_each`), the callee's tasks run inside each shard step of the caller's fan-out
(tasks/subworkflow.py): Dagster allows no dynamic output inside another, and a callee may fan out itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from mp_pipelines.calls.call import CallScope
from mp_pipelines.factory.names import CALL_RESULT_OP, INPUTS_OP, WORKFLOW_TAG, node_name
from mp_pipelines.factory.ops import (
    asset_key,
    build_task_op,
    call_scope,
    chat_model,
    check_condition,
    checked_table_path,
    llm_pool,
    make_op,
    node_prefix,
    run_items,
    settle_writes,
    split_inputs,
    upstream_ins,
)
from mp_pipelines.spec.graph import body_dependencies, step_dependencies, topological_order
from mp_pipelines.spec.models import RESERVED_SEPARATOR, LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.subworkflows import result_steps
from mp_pipelines.spec.versions import task_code_version
from mp_pipelines.tasks.runner import build_context, preview
from mp_pipelines.tasks.shards import ItemRecord
from mp_pipelines.tasks.subworkflow import call_inputs, run_call_shard

RESULT_OP = CALL_RESULT_OP  # inside a call's graph; "__" keeps it apart from task names

def called_spec(caller: WorkflowSpec, task: TaskSpec) -> WorkflowSpec:
    """The workflow `task` runs, as run there: assets under [caller, <task>__<callee>, ...] (beside the call's own
    asset [caller, task], which the IO manager stores as a file where a folder [caller, task, ...] cannot be), the
    caller's budget and limits."""
    assert task.workflow is not None
    return caller.callee(task.workflow).called_at(
        (*caller.asset_prefix, f"{task.name}{RESERVED_SEPARATOR}{task.workflow}"), caller)


def _path_check(callee: WorkflowSpec, caller_dir: Path | None) -> Callable[[str, str, str | None], str]:
    """The input-path check of a table input passed to `callee` (as for any input: inside the allowed roots),
    relative paths resolving against `folder` (the caller's for values it passes, the callee's for defaults)."""
    def check(name: str, path: str, folder: str | None) -> str:
        base = Path(folder) if folder else caller_dir
        return checked_table_path(callee, name, path, base)
    return check


def build_call_inputs_op(caller: WorkflowSpec, task: TaskSpec, callee: WorkflowSpec, upstream: list[str],
                         base_dir: Path | None = None) -> dg.OpDefinition:
    """The call's first op: its `inputs:` rendered and typed by the callee's inputs (table paths checked as any
    input's); nothing when the task's `when` is false, which skips the whole call."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        template_context = build_context(caller, workflow_inputs, values)
        if not check_condition(context, task, template_context, task.name):
            return
        try:
            found = call_inputs(caller, task, callee, template_context, _path_check(callee, base_dir))
        except ValueError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        yield dg.Output(found, metadata={name: dg.MetadataValue.text(preview(v, 200)) for name, v in found.items()})

    return make_op(callee, INPUTS_OP, compute, step=f"{node_name(node_prefix(caller), task.name)}.{INPUTS_OP}",
                   ins=upstream_ins(upstream),
                   outs={"result": dg.Out(dg.Any, is_required=task.when is None)},
                   description=f"Inputs of workflow {callee.name}, as task {task.name} of {caller.name} passes them.",
                   tags={WORKFLOW_TAG: caller.name})


def build_call_result_op(caller: WorkflowSpec, task: TaskSpec, callee: WorkflowSpec) -> tuple[dg.OpDefinition, list[str]]:
    """The call's last op: the callee's result (its `outputs:` map or its final step's output), which is the asset
    [caller, task]; and the steps it reads."""
    chosen = result_steps(callee)
    names = list(dict.fromkeys(chosen.values())) if isinstance(chosen, dict) else [chosen]

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        value = {name: inputs[step] for name, step in chosen.items()} if isinstance(chosen, dict) else inputs[chosen]
        yield dg.Output(value, metadata={"workflow": callee.name, "preview": dg.MetadataValue.text(preview(value))})

    op = make_op(callee, RESULT_OP, compute, step=f"{node_name(node_prefix(caller), task.name)}.{RESULT_OP}",
                 ins={name: dg.In(dg.Any) for name in names},
                 description=f"Result of workflow {callee.name} for task {task.name} of {caller.name}.",
                 tags={WORKFLOW_TAG: caller.name})
    return op, names


@dataclass
class CallGraph:
    """A workflow run once, as a graph: output name → the asset key it makes, and each asset's upstream keys."""

    graph: dg.GraphDefinition
    keys: dict[str, dg.AssetKey]
    deps: dict[str, set[dg.AssetKey]]


def call_graph(caller: WorkflowSpec, task: TaskSpec, upstream: list[str], provider: str,
               outside: set[dg.AssetKey]) -> CallGraph:
    """Graph `<caller>__<task>` of a workflow run once: its inputs op, its steps (ops, fan-out and loop graphs, nested
    calls) and its result op. Outputs: CALL_RESULT_OP (asset [caller, task]) and one per step of the callee (assets
    [caller, task, step, ...]); `outside` are the keys the callee's first steps read (what the call passes in)."""
    from mp_pipelines.factory.assets import _graph as graph_of
    from mp_pipelines.factory.assets import fanout_graph, loop_graph

    callee = called_spec(caller, task)
    inputs_op = build_call_inputs_op(caller, task, callee, upstream)
    result_op, result_names = build_call_result_op(caller, task, callee)
    dependencies = step_dependencies(callee)
    steps = {step.name: step for step in callee.tasks}
    order = topological_order(callee, dependencies)
    keys: dict[str, dg.AssetKey] = {CALL_RESULT_OP: asset_key(caller, task.name)}
    deps: dict[str, set[dg.AssetKey]] = {CALL_RESULT_OP: {asset_key(callee, name) for name in result_names}}
    nodes: dict[str, Any] = {}
    reads: dict[str, list[str]] = {}
    nested: dict[str, CallGraph] = {}

    def own(name: str, upstream_steps: list[str]) -> set[dg.AssetKey]:
        return {asset_key(callee, up) for up in upstream_steps} or set(outside)

    for name in order:
        step = steps[name]
        reads[name] = dependencies[name]
        if isinstance(step, LoopSpec):
            graph, reads[name] = loop_graph(callee, step, set(dependencies), provider)
            nodes[name] = graph.alias(name)
            body = body_dependencies(step, set(dependencies))
            for inner in step.tasks:
                keys[inner.name] = asset_key(callee, inner.name)
                deps[inner.name] = own(inner.name, [*body[inner.name][0], *body[inner.name][1]])
            keys[name], deps[name] = asset_key(callee, name), {asset_key(callee, t.name) for t in step.tasks}
        elif step.workflow is not None and step.for_each is None:
            inner_outside = {asset_key(callee, up) for up in reads[name]} or set(outside)
            nested[name] = call_graph(callee, step, reads[name], provider, inner_outside)
            nodes[name] = nested[name].graph.alias(name)
            for output, key in nested[name].keys.items():
                local = name if output == CALL_RESULT_OP else f"{name}{RESERVED_SEPARATOR}{output}"
                keys[local], deps[local] = key, nested[name].deps[output]
        else:
            if step.for_each is not None:
                nodes[name] = fanout_graph(callee, step, reads[name], provider).alias(name)
            else:
                nodes[name] = build_task_op(callee, step, reads[name], pool=llm_pool(provider, callee, step)).alias(name)
            keys[name], deps[name] = asset_key(callee, name), own(name, reads[name])

    def compose(values: dict[str, Any]) -> dict[str, Any]:
        handles = {INPUTS_OP: inputs_op.alias(INPUTS_OP)(**values)}
        out: dict[str, Any] = {}
        for name in order:
            result = nodes[name](**{INPUTS_OP: handles[INPUTS_OP], **{up: handles[up] for up in reads[name]}})
            step = steps[name]
            if isinstance(step, LoopSpec):
                for output in [name, *(t.name for t in step.tasks)]:
                    out[output] = getattr(result, output)
                handles[name] = out[name]
            elif name in nested:
                for output in nested[name].keys:
                    local = name if output == CALL_RESULT_OP else f"{name}{RESERVED_SEPARATOR}{output}"
                    out[local] = getattr(result, output)
                handles[name] = out[name]
            else:
                handles[name] = out[name] = result
        out[CALL_RESULT_OP] = result_op.alias(RESULT_OP)(**{name: handles[name] for name in result_names})
        return out

    graph = graph_of(node_name(node_prefix(caller), task.name), [INPUTS_OP, *upstream], list(keys), compose,
                     task.description or f"Workflow {callee.name}, run by task {task.name}.")
    return CallGraph(graph, keys, deps)


def build_call_assets(caller: WorkflowSpec, task: TaskSpec, upstream: list[str], provider: str) -> dg.AssetsDefinition:
    """The multi-asset of a workflow run once: a graph-backed asset per callee step under [caller, task, ...] and
    [caller, task] itself (the callee's result); lineage in from what the call reads, out from its result."""
    from mp_pipelines.factory.assets import KIND_TAG

    outside = {asset_key(caller, INPUTS_OP), *(asset_key(caller, name) for name in upstream)}
    found = call_graph(caller, task, upstream, provider, outside)
    callee = called_spec(caller, task)
    descriptions = {name: f"Task {key.path[-1]} of workflow {callee.name}, run by {caller.name}.{task.name}."
                    for name, key in found.keys.items()}
    descriptions[CALL_RESULT_OP] = task.description or f"Result of workflow {callee.name}."
    metadata = {name: {"workflow": caller.name, "runs_workflow": callee.name} for name in found.keys}
    tags = {name: {WORKFLOW_TAG: caller.name, KIND_TAG: ""} for name in found.keys}
    return dg.AssetsDefinition.from_graph(
        found.graph, keys_by_input_name={INPUTS_OP: asset_key(caller, INPUTS_OP),
                                         **{name: asset_key(caller, name) for name in upstream}},
        keys_by_output_name=found.keys, internal_asset_deps=found.deps, group_name=caller.name,
        descriptions_by_output_name=descriptions,
        tags_by_output_name=tags, metadata_by_output_name=metadata,
        code_versions_by_output_name={CALL_RESULT_OP: task_code_version(caller, task)}, can_subset=False)


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
    outcome = run_items(context, task, coro)
    for scope in opened:
        settle_writes(scope)
    for record in outcome:
        record.run_id = context.run_id
    return outcome
