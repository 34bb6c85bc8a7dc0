"""Asset specs `[workflow, task]` whose lineage mirrors the workflow DAG; the job's ops materialise them."""

from __future__ import annotations

import dagster as dg

from mp_pipelines.factory.names import WORKFLOW_TAG
from mp_pipelines.factory.ops import asset_key
from mp_pipelines.factory.partitions import inbox_partitions_def
from mp_pipelines.spec.graph import body_dependencies, step_dependencies
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec

_DESCRIPTION_CHARS = 300


def _describe(task: TaskSpec) -> str:
    if task.workflow is not None:
        return task.description or f"Result of workflow {task.workflow}."
    prompt = task.prompt.strip() if task.prompt else ""
    excerpt = prompt if len(prompt) <= _DESCRIPTION_CHARS else prompt[: _DESCRIPTION_CHARS - 1] + "…"
    return task.description or f"Prompt: {excerpt}"


def _spec(spec: WorkflowSpec, name: str, deps: list[str], description: str, *, outside: tuple[dg.AssetKey, ...] = (),
          root: WorkflowSpec | None = None, **metadata: object) -> dg.AssetSpec:
    """The asset of step `name`; `outside` are keys beyond `spec` it reads (a called workflow's caller steps), `root`
    the workflow whose job materialises it (its group and partitions)."""
    root = root or spec
    return dg.AssetSpec(
        key=asset_key(spec, name),
        deps=[*(asset_key(spec, dep) for dep in deps), *outside],
        description=description,
        group_name=root.name,
        kinds={"llm"},
        tags={WORKFLOW_TAG: root.name},
        metadata={"workflow": spec.name, **metadata},
        partitions_def=inbox_partitions_def(root),  # one partition per inbox file, for table workflows
    )


def build_asset_specs(spec: WorkflowSpec, *, outside: tuple[dg.AssetKey, ...] = (),
                      root: WorkflowSpec | None = None) -> list[dg.AssetSpec]:
    """One asset per task and per loop, with edges from each step's upstream steps; a workflow run once by a task
    (`workflow:`) adds its own tasks' assets under [caller, task, ...] (factory/subworkflows.py).

    For a called workflow, `root` is the workflow whose job runs it and `outside` what its caller passes in: its
    steps that read no other step depend on those."""
    from mp_pipelines.factory.subworkflows import call_asset_specs

    def asset(name: str, deps: list[str], description: str, **metadata: object) -> dg.AssetSpec:
        return _spec(spec, name, deps, description, outside=() if deps else outside, root=root, **metadata)

    dependencies = step_dependencies(spec)
    specs = []
    for step in spec.tasks:
        upstream = dependencies[step.name]
        if isinstance(step, LoopSpec):
            body = body_dependencies(step, set(dependencies))
            for task in step.tasks:
                external, earlier = body[task.name]
                specs.append(asset(task.name, [*external, *earlier], _describe(task), loop=step.name,
                                   output=task.output))
            specs.append(asset(step.name, [t.name for t in step.tasks],
                               step.description or f"Latest outputs of loop {step.name}.", kind="loop"))
        elif step.workflow is not None and step.for_each is None:
            specs.extend(call_asset_specs(spec, step, upstream, build_asset_specs, outside=outside, root=root))
        else:
            specs.append(asset(step.name, upstream, _describe(step), output=step.output, for_each=step.for_each or "",
                               **({"runs_workflow": step.workflow} if step.workflow else {})))
    return specs
