"""The shape of each task's answer, and whether what templates read from it will be there at run time.

A text answer has no attributes; a JSON answer has what its `output_schema` declares (an optional property only
under `| default(...)` or `is defined`); a fan-out is a list of item results; a loop is a mapping of its tasks'
latest outputs (tasks after the one `until` is checked on may not have run); `loop.previous` is none on the first
round. A JSON task without a schema read by attribute gets a suggested schema built from what is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from mp_pipelines.spec import graph
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.reads import EACH, Key, Read, TemplateReads


@dataclass(frozen=True)
class Shape:
    """What a value is: text, json (with or without a schema), a list of items, a loop's mapping, or unknown."""

    kind: str  # text | json | list | mapping | any
    task: str = ""  # the task whose answer it is (for messages)
    schema: Any = None  # json: the (sub)schema, None when the task has none
    element: Shape | None = None  # list: an item's shape
    members: dict[str, tuple[Shape, bool]] = field(default_factory=dict)  # mapping: task → (shape, always there)


ANY = Shape("any")


def answer_shape(spec: WorkflowSpec, task: TaskSpec) -> Shape:
    """What one task's answer is; a fan-out's is a list of item answers (rows of any columns over a table)."""
    one = Shape("text", task.name) if task.output == "text" else Shape("json", task.name, task.output_schema)
    source = graph.for_each_source(task)
    if source is None:
        return one
    if source[0] == "input":
        declared = spec.inputs.get(source[1])
        return Shape("list", task.name, element=ANY if declared is None or declared.type == "table" else one)
    return Shape("list", task.name, element=one)


def step_shape(spec: WorkflowSpec, step: TaskSpec | LoopSpec) -> Shape:
    """A top-level step's output: a task's answer, or a loop's mapping of its tasks' latest outputs."""
    if isinstance(step, TaskSpec):
        return answer_shape(spec, step)
    gate = graph.until_gate(step) if step.loop.until else len(step.tasks) - 1
    members = {t.name: (answer_shape(spec, t), index <= gate) for index, t in enumerate(step.tasks)}
    return Shape("mapping", step.name, members=members)


def element_shape(shape: Shape) -> Shape:
    """What iterating over a value gives."""
    if shape.kind == "list" and shape.element is not None:
        return shape.element
    if shape.kind == "json" and isinstance(shape.schema, dict) and _types(shape.schema) == {"array"}:
        return Shape("json", shape.task, shape.schema.get("items", {}))
    return ANY


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if kind is None:
        if any(key in schema for key in ("anyOf", "oneOf", "allOf", "$ref", "not", "if")):
            return set()
        return {"object"} if "properties" in schema else {"array"} if "items" in schema else set()
    return set(kind) - {"null"} if isinstance(kind, list) else {kind}


def _schema_step(shape: Shape, key: Key, read: Read, shown: str) -> tuple[Shape | None, str | None]:
    """One key further into a JSON value: (next shape, None) or (None, why this read fails)."""
    schema = shape.schema
    if not isinstance(schema, dict):
        return ANY, None
    kinds = _types(schema)
    if len(kinds) != 1:
        return ANY, None  # several types or a combinator: not followed
    kind = next(iter(kinds))
    whose = f"the answer of task {shape.task!r}"
    if kind == "object":
        if not isinstance(key, str) or key == EACH:
            return ANY, None
        props = schema.get("properties") or {}
        if key not in props:
            if read.guarded:
                return ANY, None
            listed = ", ".join(props) or "none"
            return None, (f"{shown}: {whose} has no property {key!r} in its output_schema (properties: {listed}); "
                          f"add it to the schema, or read it as {shown} | default(...)")
        if key not in (schema.get("required") or []) and not read.guarded:
            return None, (f"{shown}: property {key!r} of {whose} is not required by its output_schema, so it may be "
                          f"missing; add it to required, or read it as {shown} | default(...) or test "
                          f"`{shown} is defined` first")
        return Shape("json", shape.task, props[key]), None
    if kind == "array":
        if isinstance(key, str) and key != EACH:
            return None, (f"{shown}: {whose} is a list (output_schema type: array), which has no attribute {key!r}; "
                          "read one item as [index] or iterate over it")
        return Shape("json", shape.task, schema.get("items", {})), None
    if isinstance(key, str) and key != EACH:
        return None, f"{shown}: {whose} is a {kind} here (output_schema), which has no attribute {key!r}"
    return ANY, None


@dataclass(frozen=True)
class Finding:
    """Why a read fails at run time; for a JSON answer without a schema, the task and the attribute read."""

    message: str
    schemaless_task: str | None = None
    key: str = ""
    key_index: int = 0


def follow(shape: Shape, read: Read, start: int, root_text: str) -> Finding | str | None:
    """Why reading `read.path[start:]` from `shape` fails at run time, or None when it cannot be shown to."""
    shown = root_text
    for index, key in enumerate(read.path[start:], start):
        shown += f".{key}" if isinstance(key, str) and key != EACH else f"[{'*' if key == EACH else key}]"
        attribute = isinstance(key, str) and key != EACH
        if shape.kind == "any":
            return None
        if shape.kind == "text":
            if attribute:
                return (f"{shown}: task {shape.task!r} answers text, which has no attribute {key!r}; "
                        "set output: json with an output_schema that has it")
            return None
        if shape.kind == "list":
            if attribute:
                return (f"{shown}: task {shape.task!r} is a fan-out, so its output is a list of item results, which "
                        f"has no attribute {key!r}; iterate over it or read one item as {shape.task}[index]")
            shape = shape.element or ANY
            continue
        if shape.kind == "mapping":
            if not attribute or key not in shape.members:
                return None  # an unknown body task is reported as a reference problem
            member, always = shape.members[key]
            if not always and not read.guarded:
                return (f"{shown}: {key!r} runs after the task loop {shape.task!r} checks `until` on, so it has not "
                        f"run when the loop stops there; read it as {shown} | default(...)")
            shape = member
            continue
        if shape.schema is None:  # json without a schema
            if attribute and not read.guarded:
                return Finding(f"{shown}: task {shape.task!r} has output: json but no output_schema, so nothing says "
                               f"its answer has {key!r}", shape.task, str(key), index)
            return None
        shape, reason = _schema_step(shape, key, read, shown)
        if reason is not None or shape is None:
            return reason
    return None


def suggest_schema(keys: dict[str, str]) -> str:
    """A suggested output_schema (YAML flow style) for the attributes read from a schema-less JSON answer."""
    props = {key: ({"type": "array", "items": {"type": "string"}} if kind == "iterated" else {"type": kind})
             for key, kind in keys.items()}
    schema = {"type": "object", "properties": props, "required": list(keys)}
    return yaml.safe_dump(schema, default_flow_style=True, sort_keys=False, width=10_000).strip()


def guessed_type(read: Read, expression: bool, reads: TemplateReads, key_index: int) -> str:
    """What a read attribute probably holds: a list when iterated, a boolean when a condition is just it."""
    if read.iterated and len(read.path) == key_index + 1:
        return "iterated"
    if expression and len(reads.reads) == 1 and len(read.path) == key_index + 1:
        return "boolean"
    return "string"


class AnswerShapes:
    """Checks reads of one workflow's templates against its tasks' answers; `uncertain` tasks are not checked."""

    def __init__(self, spec: WorkflowSpec, uncertain: frozenset[str] = frozenset()) -> None:
        self.spec, self.uncertain = spec, uncertain
        self.steps = {step.name: step for step in spec.tasks}
        self.owner = {t.name: s for s in spec.tasks if isinstance(s, LoopSpec) for t in s.tasks}  # body → loop

    def problem(self, read: Read, found: TemplateReads, task: TaskSpec | None,
                loop: LoopSpec | None) -> Finding | str | None:
        """Why `read` (in a template of `task`, inside `loop` if any) fails at run time, or None when it should not."""
        name, path = read.root, read.path
        if name in self.uncertain or (path and path[0] in self.uncertain):
            return None
        if name == "item" and task is not None and task.for_each is not None:
            source = graph.for_each_source(task)
            step = self.steps.get(source[1]) if source is not None and source[0] == "step" else None
            if step is None or isinstance(step, LoopSpec) or step.name in self.uncertain:
                return None
            return follow(element_shape(step_shape(self.spec, step)), read, 0, "item")
        if name == "loop" and loop is not None:
            return self.previous_problem(read, found, loop)
        step = self.steps.get(name)
        if step is not None:
            return follow(step_shape(self.spec, step), read, 0, name)
        owner = self.owner.get(name)
        if owner is not None and owner is loop:
            body = next(t for t in owner.tasks if t.name == name)
            return follow(answer_shape(self.spec, body), read, 0, name)
        return None

    def previous_problem(self, read: Read, found: TemplateReads, loop: LoopSpec) -> Finding | str | None:
        """loop.previous is none on the first round: reading into it needs a test of it or a default."""
        path = read.path
        if len(path) < 2 or path[0] != "previous" or not isinstance(path[1], str):
            return None
        task = next((t for t in loop.tasks if t.name == path[1]), None)
        if task is None or task.name in self.uncertain:
            return None
        shown = f"loop.previous.{task.name}"
        if not read.guarded and ("loop", ("previous",)) not in found.tested:
            return (f"{shown}: loop.previous is none on the first round of loop {loop.name!r}; write "
                    f"`{shown} if loop.previous else ...` or `{shown} | default(...)`")
        return follow(answer_shape(self.spec, task), read, 2, shown)
