"""A workflow's assets: `[workflow, inputs]` and one materializable asset per task, loop body task and loop.

Each asset is made by its own node, so the job of a workflow is an asset job over them and any subset can be
materialized: a task's upstream values come from the latest materializations through the IO manager.

- plain task `t` → an asset over op `w__t` whose inputs are its upstream assets;
- fan-out `t` → a graph-backed asset `w__t` (items op → mapped shard op → collect op → publish op, fanout.py);
- loop `l` → a graph-backed multi-asset `w__l` over its unrolled iterations (loops.py), one output per body task
  (its latest answer) plus the loop's result; it cannot be subset, since every iteration reads the one before.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from mp_pipelines.factory.fanout import build_collect_op, build_items_op, build_publish_op, build_shard_op
from mp_pipelines.factory.loops import build_body_op, build_loop_result_op
from mp_pipelines.factory.names import (
    INPUTS_OP,
    ITEM_RECORDS,
    WORKFLOW_TAG,
    collect_local,
    items_local,
    node_name,
    publish_local,
)
from mp_pipelines.factory.ops import asset_key, build_inputs_op, build_task_op, llm_pool
from mp_pipelines.spec.graph import body_dependencies, for_each_source, loop_iterations, step_dependencies
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.versions import body_code_version, loop_code_version, task_code_version

_DESCRIPTION_CHARS = 300
KIND_TAG = "dagster/kind/llm"  # the kind badge ("llm") on every task asset


def _describe(task: TaskSpec) -> str:
    prompt = task.prompt.strip()
    excerpt = prompt if len(prompt) <= _DESCRIPTION_CHARS else prompt[: _DESCRIPTION_CHARS - 1] + "…"
    return task.description or f"Prompt: {excerpt}"


def _tags(spec: WorkflowSpec) -> dict[str, str]:
    return {WORKFLOW_TAG: spec.name, KIND_TAG: ""}


def _input_keys(spec: WorkflowSpec, upstream: list[str]) -> dict[str, dg.AssetKey]:
    return {INPUTS_OP: asset_key(spec, INPUTS_OP), **{name: asset_key(spec, name) for name in upstream}}


def _graph(name: str, inputs: list[str], outputs: list[str], compose: Callable[..., Any],
           description: str | None) -> dg.GraphDefinition:
    """A graph named `name` whose inputs are `inputs` (upstream values by name) and outputs `outputs`."""
    def body(**values: Any) -> Any:
        return compose(values)

    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in inputs])
    body.__name__ = name
    return dg.graph(name=name, description=description, ins={n: dg.GraphIn() for n in inputs},
                    out={n: dg.GraphOut() for n in outputs})(body)


def build_inputs_asset(spec: WorkflowSpec, base_dir: Path | None) -> dg.AssetsDefinition:
    """`[workflow, inputs]`: the op whose run config (`ops.inputs.config`) holds the workflow inputs."""
    return dg.AssetsDefinition.from_op(
        build_inputs_op(spec, base_dir), keys_by_output_name={"result": asset_key(spec, INPUTS_OP)},
        group_name=spec.name,
        descriptions_by_output_name={"result": f"The inputs of workflow {spec.name} (checked)."},
        tags_by_output_name={"result": {WORKFLOW_TAG: spec.name}},
        metadata_by_output_name={"result": {"workflow": spec.name}})


def build_task_asset(spec: WorkflowSpec, task: TaskSpec, upstream: list[str], provider: str) -> dg.AssetsDefinition:
    """A plain task's asset, made by its op (code version on the op's output)."""
    op = build_task_op(spec, task, upstream, pool=llm_pool(provider, spec, task))
    return dg.AssetsDefinition.from_op(
        op, keys_by_input_name=_input_keys(spec, upstream), keys_by_output_name={"result": asset_key(spec, task.name)},
        group_name=spec.name,
        descriptions_by_output_name={"result": _describe(task)}, tags_by_output_name={"result": _tags(spec)},
        metadata_by_output_name={"result": {"workflow": spec.name, "output": task.output}})


def build_fanout_asset(spec: WorkflowSpec, task: TaskSpec, upstream: list[str],
                       provider: str) -> dg.AssetsDefinition:
    """A fan-out's asset: graph `w__t` of its items op, mapped shard op and collect op."""
    kind, source = for_each_source(task)  # type: ignore[misc]
    pool = llm_pool(provider, spec, task)  # the collector may call the model too (items a failed run left)
    items_op = build_items_op(spec, task, "input" if kind == "input" else "step", source).alias(items_local(task.name))
    shard_op = build_shard_op(spec, task, upstream, pool=pool).alias(task.name)
    collect_op = build_collect_op(spec, task, upstream, pool=pool).alias(collect_local(task.name))
    publish_op = build_publish_op(spec, task).alias(publish_local(task.name))

    def compose(values: dict[str, Any]) -> Any:
        items_in = {INPUTS_OP: values[INPUTS_OP]} if kind == "input" else {INPUTS_OP: values[INPUTS_OP],
                                                                           source: values[source]}
        items = items_op(**items_in)
        mapped = items.map(lambda item: shard_op(item=item, **values))
        collected = collect_op(records=mapped.collect(), shards=items.collect(), **values)
        return {"result": publish_op(collected=collected.result, records=getattr(collected, ITEM_RECORDS))}

    graph = _graph(node_name(spec.name, task.name), [INPUTS_OP, *upstream], ["result"], compose,
                   task.description or None)
    return dg.AssetsDefinition.from_graph(
        graph, keys_by_input_name=_input_keys(spec, upstream), keys_by_output_name={"result": asset_key(spec, task.name)},
        group_name=spec.name,
        descriptions_by_output_name={"result": _describe(task)}, tags_by_output_name={"result": _tags(spec)},
        metadata_by_output_name={"result": {"workflow": spec.name, "output": task.output,
                                            "for_each": task.for_each or ""}},
        code_versions_by_output_name={"result": task_code_version(spec, task)})


def build_loop_assets(spec: WorkflowSpec, loop: LoopSpec, step_names: set[str], provider: str) -> dg.AssetsDefinition:
    """A loop's multi-asset: graph `w__l` of its unrolled iterations; outputs are each body task's latest answer
    and the loop's result."""
    body = body_dependencies(loop, step_names)
    upstream = sorted({name for external, _ in body.values() for name in external})
    ops = {(index, iteration): build_body_op(spec, loop, index, iteration, body[task.name][0],
                                             pool=llm_pool(provider, spec, task))
           for iteration in range(1, loop_iterations(spec, loop) + 1) for index, task in enumerate(loop.tasks)}
    result_op = build_loop_result_op(spec, loop).alias(loop.name)

    def compose(values: dict[str, Any]) -> Any:
        state = None
        finished = []
        for (index, iteration), op_def in ops.items():
            task = loop.tasks[index]
            kwargs = {INPUTS_OP: values[INPUTS_OP], **{name: values[name] for name in body[task.name][0]}}
            if state is not None:
                kwargs["state"] = state
            result = op_def.alias(f"{task.name}__{iteration}")(**kwargs)
            outputs = set(op_def.outs)
            if outputs == {"next", "done"}:
                state, done = result.next, result.done
                finished.append(done)
            elif outputs == {"done"}:
                finished.append(result)
            else:
                state = result
        published = result_op(states=finished)
        return {name: getattr(published, name) for name in [loop.name, *(t.name for t in loop.tasks)]}

    outputs = [loop.name, *(t.name for t in loop.tasks)]
    graph = _graph(node_name(spec.name, loop.name), [INPUTS_OP, *upstream], outputs, compose, loop.description or None)
    deps = {task.name: {asset_key(spec, INPUTS_OP), *(asset_key(spec, n) for n in [*body[task.name][0],
                                                                                  *body[task.name][1]])}
            for task in loop.tasks}
    deps[loop.name] = {asset_key(spec, t.name) for t in loop.tasks}
    descriptions = {task.name: _describe(task) for task in loop.tasks}
    descriptions[loop.name] = loop.description or f"Latest outputs of loop {loop.name}."
    metadata = {task.name: {"workflow": spec.name, "output": task.output, "loop": loop.name} for task in loop.tasks}
    metadata[loop.name] = {"workflow": spec.name, "kind": "loop"}
    versions = {task.name: body_code_version(spec, loop, task) for task in loop.tasks}
    versions[loop.name] = loop_code_version(spec, loop)
    return dg.AssetsDefinition.from_graph(
        graph, keys_by_input_name=_input_keys(spec, upstream),
        keys_by_output_name={name: asset_key(spec, name) for name in outputs}, internal_asset_deps=deps,
        group_name=spec.name, descriptions_by_output_name=descriptions,
        tags_by_output_name={name: _tags(spec) for name in outputs}, metadata_by_output_name=metadata,
        code_versions_by_output_name=versions, can_subset=False)


def build_assets(spec: WorkflowSpec, *, provider: str = "simulated",
                 base_dir: Path | None = None) -> list[dg.AssetsDefinition]:
    """Every asset of the workflow: its inputs, then one per task and loop in file order."""
    dependencies = step_dependencies(spec)
    assets = [build_inputs_asset(spec, base_dir)]
    for step in spec.tasks:
        if isinstance(step, LoopSpec):
            assets.append(build_loop_assets(spec, step, set(dependencies), provider))
        elif step.for_each:
            assets.append(build_fanout_asset(spec, step, dependencies[step.name], provider))
        else:
            assets.append(build_task_asset(spec, step, dependencies[step.name], provider))
    return assets
