"""Spec → Dagster job: the asset job over a workflow's assets, its executor and run config."""

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
from mp_pipelines.factory.assets import build_assets
from mp_pipelines.factory.checks import build_asset_checks
from mp_pipelines.factory.logs import LOGGER_DEFS
from mp_pipelines.factory.names import (
    BUDGET_RESOURCE_KEY,
    FANOUT_TAG,
    INPUTS_OP,
    LLM_RESOURCE_KEY,
    PROVIDER_TAG,
    WORKFLOW_TAG,
    inputs_step,
)
from mp_pipelines.factory.ops import input_field
from mp_pipelines.factory.resources import RunBudget
from mp_pipelines.llm.resource import build_llm_resource
from mp_pipelines.spec.graph import loop_iterations
from mp_pipelines.spec.models import LoopSpec, WorkflowSpec


def job_name(spec: WorkflowSpec) -> str:
    return spec.name


def build_executor(spec: WorkflowSpec) -> dg.ExecutorDefinition:
    """The executor of the workflow's job, see `executor_for_breadth`."""
    return executor_for_breadth(spec.breadth)


def executor_for_breadth(breadth: int) -> dg.ExecutorDefinition:
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
                "max_concurrent": dg.Field(dg.Int, default_value=breadth,
                                           description="Most steps running at once in this run."),
                "start_method": dg.Field(dg.Enum("StartMethod", [dg.EnumValue("forkserver"), dg.EnumValue("spawn")]),
                                         default_value="forkserver"),
            }),
            "in_process": dg.Field({}),
            "celery": dg.Field(CELERY_EXECUTOR_CONFIG),
        }),
        default_value={"concurrent": {}},
    )
    limit = {"key": FANOUT_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": breadth}

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


def job_config(spec: WorkflowSpec) -> dg.ConfigMapping:
    """The run config users write for the workflow's job.

    Inputs go under `ops.inputs.config`, mapped onto the inputs op `<workflow>__inputs` (op names are unique in the
    code location); `execution`, `resources` and `loggers` pass through as given and are checked against the job's
    own schema. Inputs may be left out: a run of a subset of the assets without the inputs needs none.
    """
    inputs = {name: input_field(input_spec) for name, input_spec in spec.inputs.items()}
    passed = {key: dg.Field(dg.Permissive(), is_required=False) for key in ("execution", "resources", "loggers")}
    schema = {"ops": dg.Field({INPUTS_OP: dg.Field({"config": dg.Field(inputs, is_required=False)}, is_required=False,
                                                   description=f"The inputs of workflow {spec.name}.")},
                              is_required=False), **passed}
    inputs_node = inputs_step(spec.name)

    def to_job_config(config: dict[str, Any]) -> dict[str, Any]:
        mapped = {key: value for key, value in config.items() if key != "ops" and value is not None}
        given = (config.get("ops") or {}).get(INPUTS_OP)
        if given is not None:
            mapped["ops"] = {inputs_node: given}
        return mapped

    return dg.ConfigMapping(config_schema=schema, config_fn=to_job_config)


def build_job_definition(spec: WorkflowSpec, assets: list[dg.AssetsDefinition],
                         provider: str = "simulated") -> dg.UnresolvedAssetJobDefinition:
    """The job of a workflow: every asset of it (factory/assets.py), named after the workflow.

    `provider` ("simulated" or "openai") goes into the job's tags (for run queue limits) and op pools.
    """
    return dg.define_asset_job(
        name=job_name(spec),
        selection=dg.AssetSelection.assets(*assets),
        config=job_config(spec),
        description=spec.description or None,
        tags={**spec.tags, WORKFLOW_TAG: spec.name, PROVIDER_TAG: provider},
        executor_def=build_executor(spec),
    )


def build_job(spec: WorkflowSpec, *, provider: str = "simulated", base_dir: Path | None = None,
              resources: dict[str, Any] | None = None) -> dg.JobDefinition:
    """The workflow's job resolved on its own, with `resources` (default: the LLM resource from the environment and
    the workflow's budget), e.g. for a schedule's target or a test."""
    if resources is None:
        resources = {LLM_RESOURCE_KEY: build_llm_resource(), BUDGET_RESOURCE_KEY: RunBudget()}
    assets = build_assets(spec, provider=provider, base_dir=base_dir)
    with recursion_headroom(op_count(spec)):
        defs = dg.Definitions(assets=assets, jobs=[build_job_definition(spec, assets, provider)],
                              asset_checks=build_asset_checks(spec), resources=resources, loggers=LOGGER_DEFS)
        return defs.resolve_job_def(job_name(spec))
