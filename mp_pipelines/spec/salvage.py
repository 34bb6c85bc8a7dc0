"""A workflow's data with what the structure checks refused taken out, so the later checks (references, cycles,
templates, answer shapes) still run and `validate` lists every problem of a file at once.

A refused field is dropped (its default applies), a refused list entry removed, a refused task or loop name
replaced by a placeholder; the tasks touched are named as *uncertain*, so their answers' shape is not checked.
Where the later checks truly cannot run (no task list, a task that is no mapping), `salvage` says why instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from mp_pipelines.spec.models import WorkflowSpec

_STEP_TAGS = ("task", "loop")  # Pydantic's tags of the task/loop union, which are not keys of the data
_FAN_OUT_ONLY = ("shard_size", "on_item_failure", "min_success_ratio", "output_schema")
_ROUNDS = 5
_SHAPE_FIELDS = ("output", "output_schema", "for_each", "loop", "tasks", "name", "prompt")


class Salvage:
    """The salvaged spec (None when the later checks cannot run), tasks whose shape is unknown, and why not."""

    def __init__(self) -> None:
        self.spec: WorkflowSpec | None = None
        self.uncertain: set[str] = set()
        self.blocker: str | None = None


def _data_path(data: Any, loc: Sequence[str | int]) -> list[str | int]:
    """`loc` as keys of `data`: the union tags Pydantic adds are dropped."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif part in _STEP_TAGS or part == "[key]":
            continue
        else:
            break
        path.append(part)
    return path


def _task_name(data: dict[str, Any], path: Sequence[str | int]) -> str | None:
    """The name of the innermost task or loop a path lies in, when the path may change what it answers."""
    name, field = None, None
    node: Any = data
    for depth, part in enumerate(path):
        node = node[part] if isinstance(node, (dict, list)) else None
        if depth >= 1 and path[depth - 1] == "tasks" and isinstance(node, dict) and isinstance(node.get("name"), str):
            name = node["name"]
            field = path[depth + 1] if depth + 1 < len(path) else None
    return name if field is None or field in _SHAPE_FIELDS else None


def _fix(data: dict[str, Any], error: ErrorDetails, result: Salvage, drop: list[tuple[list[Any], int]]) -> None:
    """Take out what one error is about, or set result.blocker when the later checks cannot run without it."""
    loc = list(error["loc"])
    path = _data_path(data, loc)
    if len(path) < len(loc) and error["type"] == "missing":
        key = loc[-1]
        parent = _get(data, path)
        if path == [] and key == "tasks":
            result.blocker = "the workflow has no tasks"
        elif path == [] and key == "name":
            data["name"] = "unnamed_workflow"
        elif key == "prompt" and isinstance(parent, dict):
            parent["prompt"] = "-"
            result.uncertain.add(str(parent.get("name")))
        elif key == "name" and isinstance(parent, dict):
            parent["name"] = f"unnamed_step_{len(result.uncertain)}"
            result.uncertain.add(parent["name"])
        elif key == "cron" and path == ["schedule"]:
            data.pop("schedule", None)
        elif key == "tasks" and isinstance(parent, dict):
            result.blocker = f"loop {parent.get('name')!r} has no tasks"
        else:
            result.blocker = f"{'.'.join(map(str, loc))} is missing"
        return
    if not path:
        result.blocker = "the workflow is not a mapping of its fields"
        return
    if "checks" in path[:-1] and isinstance(path[path.index("checks") + 1], int):
        # A refused check becomes one that raises nothing, so the later checks' paths keep their indices.
        at = path.index("checks") + 1
        _get(data, path[:at])[path[at]] = {"type": "non_empty", "name": f"_refused_check_{path[at]}"}
        return
    *above, last = path
    parent = _get(data, above)
    target = _get(data, path)
    owner = _task_name(data, path)
    if owner is not None:
        result.uncertain.add(owner)
    if above == ["tasks"] or (len(above) == 3 and above[0] == "tasks" and above[2] == "tasks"):
        if not isinstance(target, dict):  # a step that is no mapping
            result.blocker = f"{'.'.join(map(str, path))} is not a task or loop mapping"
            return
        for key in _FAN_OUT_ONLY:  # a task-wide rule (model validator) failed
            target.pop(key, None)
        if error["type"] in ("union_tag_invalid", "model_type", "dict_type"):
            result.blocker = f"{'.'.join(map(str, path))} is not a task or loop"
        return
    if above == ["inputs"] and isinstance(target, dict):
        target.pop("default", None)  # a default that does not match the type
        if error["type"] != "value_error":
            target.pop("type", None)
        return
    if last == "name" and isinstance(parent, dict):
        if above:
            parent["name"] = f"unnamed_step_{len(result.uncertain)}"
            result.uncertain.add(parent["name"])
        else:
            parent["name"] = "unnamed_workflow"
        return
    if isinstance(parent, dict):
        parent.pop(last, None)
    elif isinstance(parent, list) and isinstance(last, int):
        drop.append((parent, last))


def _get(data: Any, path: Sequence[str | int]) -> Any:
    node = data
    for part in path:
        node = node[part]
    return node


def salvage(data: dict[str, Any], exc: ValidationError) -> Salvage:
    """The spec the data gives once every refused part is taken out (a few rounds), or why none can be made."""
    result = Salvage()
    work = copy.deepcopy(data)
    for _ in range(_ROUNDS):
        drop: list[tuple[list[Any], int]] = []
        for error in exc.errors(include_url=False):
            _fix(work, error, result, drop)
            if result.blocker:
                return result
        for parent, index in sorted(drop, key=lambda d: -d[1]):
            if index < len(parent):
                del parent[index]
        try:
            result.spec = WorkflowSpec.model_validate(work)
            return result
        except ValidationError as again:
            exc = again
    result.blocker = "the fields above could not be taken out to check the rest"
    return result
