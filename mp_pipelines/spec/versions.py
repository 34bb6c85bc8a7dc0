"""Code versions of task and loop assets: a digest of what decides a task's answer, never of rendered prompts.

Dagster compares an asset's `code_version` with the one its latest materialization was made with; a change marks
the asset, and everything downstream of it, unsynced. The digest covers the task's template source (prompt and
system message as written, see `template_sources`), the model and its parameters, the output kind and schema and the
`for_each` expression; a loop's covers its tasks' and its own control.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mp_pipelines.spec.library import library_sources
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec

_DIGEST_CHARS = 16
# Bump when the set of fields below changes, so every asset reads as changed once rather than silently not.
_SCHEME = 1


def template_sources(spec: WorkflowSpec, task: TaskSpec) -> list[str]:
    """The unrendered template texts the task's answer depends on: its prompt and its system message (its own or
    the workflow default's), then every prompt-library file they include or import, with its name."""
    system = spec.settings_for(task).system
    texts = [task.prompt or "", system or ""]
    return texts + [f"{name}\n{text}" for source in texts for name, text in library_sources(spec, source)]


def _task_fields(spec: WorkflowSpec, task: TaskSpec) -> dict[str, Any]:
    settings = spec.settings_for(task)
    return {
        "templates": template_sources(spec, task),
        "model": settings.model,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "output": task.output,
        "output_schema": task.output_schema,
        "for_each": task.for_each,
        "when": task.when,
        **(_call_fields(spec, task) if task.workflow is not None else {}),
    }


def _call_fields(spec: WorkflowSpec, task: TaskSpec) -> dict[str, Any]:
    """What decides a sub-workflow's result: the inputs passed, and every task of the called workflow."""
    try:
        callee = spec.callee(task.workflow or "")
    except KeyError:  # not resolved (a spec built in code): its name stands for it
        return {"workflow": task.workflow, "inputs": task.inputs}
    steps = [{"loop": loop_code_version(callee, step)} if isinstance(step, LoopSpec) else _task_fields(callee, step)
             for step in callee.tasks]
    return {"workflow": task.workflow, "inputs": task.inputs, "callee": steps, "outputs": callee.outputs}


def _digest(fields: Any) -> str:
    text = json.dumps({"scheme": _SCHEME, "fields": fields}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST_CHARS]


def task_code_version(spec: WorkflowSpec, task: TaskSpec) -> str:
    """The code version of a task's asset."""
    return _digest(_task_fields(spec, task))


def loop_code_version(spec: WorkflowSpec, loop: LoopSpec) -> str:
    """The code version of a loop's result asset: its tasks' versions and its iteration control."""
    return _digest({"tasks": [_task_fields(spec, task) for task in loop.tasks],
                    "max_iterations": loop.loop.max_iterations, "until": loop.loop.until, "depth": spec.depth})


def body_code_version(spec: WorkflowSpec, loop: LoopSpec, task: TaskSpec) -> str:
    """The code version of a loop body task's asset: its own fields and its loop's, since every iteration after
    the first reads the other body tasks' answers."""
    return _digest({"task": _task_fields(spec, task), "loop": loop_code_version(spec, loop)})
