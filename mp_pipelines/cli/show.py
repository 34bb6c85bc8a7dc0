"""A workflow's DAG as text, for `mp-pipelines show`."""

from __future__ import annotations

from mp_pipelines.spec.checks import check_names
from mp_pipelines.spec.graph import body_dependencies, loop_iterations, step_dependencies, topological_order
from mp_pipelines.spec.models import InputSpec, LoopSpec, TaskSpec, WorkflowSpec


def _input_line(name: str, spec: InputSpec) -> str:
    state = "required" if spec.required else f"default {spec.default!r}"
    about = f" — {spec.description}" if spec.description else ""
    return f"  {name}: {spec.type}, {state}{about}"


def _task_traits(spec: WorkflowSpec, task: TaskSpec) -> str:
    settings = spec.settings_for(task)
    traits = [task.output, settings.model or "default model"]
    if task.for_each:
        traits.append(f"for_each {task.for_each} (≤{spec.breadth} at once, ≤{spec.max_items} items)")
    if task.when:
        traits.append(f"when {task.when}")
    if task.retries:
        traits.append(f"retries {task.retries.max_retries}"
                      + (f" {task.retries.backoff}" if task.retries.backoff else ""))
    if task.timeout:
        traits.append(f"timeout {task.timeout:g} s")
    if task.checks:
        named = [f"{name}{' (blocking)' if check.blocking and check.severity == 'error' else ''}"
                 for check, name in zip(task.checks, check_names(task.checks))]
        traits.append(f"checks {', '.join(named)}")
    return ", ".join(traits)


def _arrow(upstream: list[str]) -> str:
    return f"  ← {', '.join(upstream)}" if upstream else ""


def render_workflow(spec: WorkflowSpec) -> str:
    """Inputs, limits and each step in run order with its upstream steps."""
    lines = [f"{spec.name}: {spec.description}".rstrip(": "), "inputs:"]
    lines += [_input_line(n, s) for n, s in spec.inputs.items()] or ["  (none)"]
    lines.append(f"limits: breadth {spec.breadth}, depth {spec.depth}, max_items {spec.max_items}")
    if spec.schedule:
        state = "on" if spec.schedule.enabled else "off"
        lines.append(f"schedule: {spec.schedule.cron} ({spec.schedule.timezone}, {state})")
    lines.append("steps:")
    dependencies = step_dependencies(spec)
    steps = {step.name: step for step in spec.tasks}
    for name in topological_order(spec, dependencies):
        step = steps[name]
        upstream = ["inputs", *dependencies[name]]
        if isinstance(step, LoopSpec):
            until = f" until {step.loop.until}" if step.loop.until else ""
            lines.append(f"  {name}: loop, ≤{loop_iterations(spec, step)} iterations{until}{_arrow(dependencies[name])}")
            body = body_dependencies(step, set(dependencies))
            for task in step.tasks:
                external, earlier = body[task.name]
                lines.append(f"    {task.name}: {_task_traits(spec, task)}{_arrow([*external, *earlier])}")
        else:
            lines.append(f"  {name}: {_task_traits(spec, step)}{_arrow(upstream)}")
    return "\n".join(lines)
