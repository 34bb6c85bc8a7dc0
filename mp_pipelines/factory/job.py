"""Spec → Dagster job: compose the ops of every step in dependency order."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from mp_pipelines.dagster_ext.celery import CELERY_EXECUTOR_CONFIG
from mp_pipelines.dagster_ext.executor import selectable_executor
from mp_pipelines.factory.fanout import build_collect_op, build_items_op, build_shard_op
from mp_pipelines.factory.logs import LOGGER_DEFS
from mp_pipelines.factory.loops import build_body_op, build_loop_result_op
from mp_pipelines.factory.names import FANOUT_TAG, INPUTS_OP, PROVIDER_TAG, WORKFLOW_TAG
from mp_pipelines.factory.ops import build_inputs_op, build_task_op, llm_pool
from mp_pipelines.factory.partitions import inbox_partitioned_config, inbox_partitions_def
from mp_pipelines.factory.subworkflows import compose_call
from mp_pipelines.spec.graph import (
    body_dependencies,
    for_each_source,
    loop_iterations,
    step_dependencies,
    topological_order,
)
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec

Handles = dict[str, Any]  # step name → the composition handle carrying its value


def job_name(spec: WorkflowSpec) -> str:
    return spec.name


def build_executor(spec: WorkflowSpec) -> dg.ExecutorDefinition:
    """The concurrent executor by default; Dagster's multiprocess or in-process one when a run asks.

    Selectable per run: `execution: {config: {concurrent: {max_concurrent: N}}}`, `{in_process: {}}`,
    `{multiprocess: {max_concurrent: N}}` or `{celery: {broker, backend, config_source}}` (steps on a Celery
    worker fleet; broker and backend default to MP_CELERY_BROKER / MP_CELERY_BACKEND). Every choice keeps one
    fan-out's calls within `breadth`.
    """
    schema = dg.Field(
        dg.Selector({
            "concurrent": dg.Field({
                "max_concurrent": dg.Field(dg.Int, default_value=64,
                                           description="Most steps running at once in this run (threads)."),
            }),
            "multiprocess": dg.Field({
                "max_concurrent": dg.Field(dg.Int, default_value=spec.breadth,
                                           description="Most steps running at once in this run."),
                "start_method": dg.Field(dg.Enum("StartMethod", [dg.EnumValue("forkserver"), dg.EnumValue("spawn")]),
                                         default_value="forkserver"),
            }),
            "in_process": dg.Field({}),
            "celery": dg.Field(CELERY_EXECUTOR_CONFIG),
        }),
        default_value={"concurrent": {}},
    )
    limit = {"key": FANOUT_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": spec.breadth}

    def to_selected_config(config: dict[str, Any]) -> dict[str, Any]:
        ((kind, options),) = config.items()
        if kind == "in_process":
            return {"in_process": {}}
        if kind == "celery":  # breadth holds across the workers through the fleet's shared limits
            return {"celery": options}
        if kind == "concurrent":
            return {"concurrent": {"max_concurrent": options["max_concurrent"], "tag_concurrency_limits": [limit]}}
        return {"multiprocess": {"max_concurrent": options["max_concurrent"], "tag_concurrency_limits": [limit],
                                 "start_method": {options["start_method"]: {}}}}

    return selectable_executor.configured(to_selected_config, name="mp_pipelines_executor", config_schema=schema)


def _compose_task(spec: WorkflowSpec, task: TaskSpec, upstream: list[str], handles: Handles, provider: str) -> Any:
    kwargs = {INPUTS_OP: handles[INPUTS_OP], **{name: handles[name] for name in upstream}}
    source = for_each_source(task)
    if task.workflow is not None and source is None:  # a workflow run once: a nested graph (factory/subworkflows.py)
        return compose_call(spec, task, upstream, kwargs, provider, compose_steps)
    if source is None:
        return build_task_op(spec, task, upstream, pool=llm_pool(provider, spec, task))(**kwargs)
    kind, name = source
    items_kwargs = {INPUTS_OP: handles[INPUTS_OP]} if kind == "input" else {INPUTS_OP: handles[INPUTS_OP], name: handles[name]}
    items = build_items_op(spec, task, "input" if kind == "input" else "step", name)(**items_kwargs)
    pool = llm_pool(provider, spec, task)  # the collector may call the model too (items a failed run left)
    item_op = build_shard_op(spec, task, upstream, pool=pool)
    mapped = items.map(lambda item: item_op(item=item, **kwargs))
    collect = build_collect_op(spec, task, upstream, pool=pool)
    return collect(records=mapped.collect(), shards=items.collect(), **kwargs).result


def _compose_loop(spec: WorkflowSpec, loop: LoopSpec, handles: Handles, step_names: set[str], provider: str) -> Any:
    body = body_dependencies(loop, step_names)
    state = None
    finished = []
    for iteration in range(1, loop_iterations(spec, loop) + 1):
        for index, task in enumerate(loop.tasks):
            external = body[task.name][0]
            op = build_body_op(spec, loop, index, iteration, external, pool=llm_pool(provider, spec, task))
            kwargs = {INPUTS_OP: handles[INPUTS_OP], **{name: handles[name] for name in external}}
            if state is not None:
                kwargs["state"] = state
            result = op(**kwargs)
            outputs = set(op.node_def.outs)
            if outputs == {"next", "done"}:
                state, done = result.next, result.done
                finished.append(done)
            elif outputs == {"done"}:
                finished.append(result)
            else:
                state = result
    return build_loop_result_op(spec, loop)(states=finished)


def compose_steps(spec: WorkflowSpec, handles: Handles, provider: str) -> Handles:
    """Compose every step of `spec` in dependency order after `handles[INPUTS_OP]`; the handles by step name."""
    dependencies = step_dependencies(spec)
    step_names = set(dependencies)
    steps = {step.name: step for step in spec.tasks}
    for name in topological_order(spec, dependencies):
        step = steps[name]
        if isinstance(step, LoopSpec):
            handles[name] = _compose_loop(spec, step, handles, step_names, provider)
        else:
            handles[name] = _compose_task(spec, step, dependencies[name], handles, provider)
    return handles


def op_count(spec: WorkflowSpec) -> int:
    """Most ops the job of `spec` has: three per fan-out (items, shards, collect), one per task otherwise, a
    loop's tasks once per iteration plus the loop's result, and the inputs op."""
    count = 1
    for step in spec.tasks:
        if isinstance(step, LoopSpec):
            count += 3 * len(step.tasks) * loop_iterations(spec, step) + 1
        elif step.workflow is not None and not step.for_each:
            count += 2 + op_count(spec.callee(step.workflow))
        else:
            count += 3 if step.for_each else 1
    return count


_HEADROOM = threading.Lock()  # one build at a time changes the process's recursion limit


@contextmanager
def recursion_headroom(ops: int) -> Iterator[None]:
    """Let Python recurse deep enough, while inside, to make the Dagster graph of a job of `ops` ops.

    Dagster walks a job's dependencies recursively when it makes the graph, one frame per op along the
    longest chain (`create_adjacency_lists`), so a chain of ~1,000 ops passes Python's default limit of 1,000
    frames. The limit is raised only for that and restored after, since C code (json, repr, pickle) counts
    against the same limit on a thread's smaller C stack.
    """
    needed = 1_000 + 2 * ops
    with _HEADROOM:
        before = sys.getrecursionlimit()
        sys.setrecursionlimit(max(before, needed))
        try:
            yield
        finally:
            sys.setrecursionlimit(before)


def build_job(spec: WorkflowSpec, *, provider: str = "simulated", base_dir: Path | None = None) -> dg.JobDefinition:
    """The job of a workflow: an `inputs` op, then one op per task in dependency order.

    `provider` ("simulated" or "openai") goes into the job's tags (for run queue limits) and op pools.
    """
    def compose() -> None:
        compose_steps(spec, {INPUTS_OP: build_inputs_op(spec, base_dir)()}, provider)

    compose.__name__ = job_name(spec)
    with recursion_headroom(op_count(spec)):
        return dg.job(
            name=job_name(spec),
            description=spec.description or None,
            tags={**spec.tags, WORKFLOW_TAG: spec.name, PROVIDER_TAG: provider},
            executor_def=build_executor(spec),
            logger_defs=LOGGER_DEFS,  # `console`: with the trace id, or JSON lines (MP_LOG_FORMAT=json)
            partitions_def=inbox_partitions_def(spec),  # inbox files, for workflows with a table input
            config=inbox_partitioned_config(spec),
        )(compose)
