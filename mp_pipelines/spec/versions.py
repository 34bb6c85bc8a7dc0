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

from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec

_DIGEST_CHARS = 16
# Bump when the set of fields below changes, so every asset reads as changed once rather than silently not.
_SCHEME = 1


def template_sources(spec: WorkflowSpec, task: TaskSpec) -> list[str]:
    """The unrendered template texts the task's answer depends on: its prompt and its system message (its own or
    the workflow default's). Extend this, not `task_code_version`, when templates can include others."""
    system = spec.settings_for(task).system
    return [task.prompt, system or ""]


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
    }


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
