"""What is wrong with a workflow spec, said as file, field path and reason: problems, the error that lists
them, "did you mean" hints, and Pydantic's errors turned into problems."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from mp_pipelines.spec.models import WorkflowSpec


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow: where (file, field path) and why."""

    file: str | None
    path: str
    message: str

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.path, self.message) if part)


class WorkflowValidationError(ValueError):
    """A workflow spec is invalid; `.problems` lists every problem found."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None, notes: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        self.notes = list(notes)  # checks that could not run because of the problems, and why
        self.source = source if source is not None else next((p.file for p in self.problems if p.file), None)
        count = len(self.problems)
        summary = f"{count} problem{'s' if count != 1 else ''} in {self.source or 'workflow spec'}"
        lines = [f"  {problem}" for problem in self.problems] + [f"  note: {note}" for note in self.notes]
        super().__init__("\n".join([summary, *lines]))

    def __reduce__(self) -> tuple[type[WorkflowValidationError], tuple[list[Problem], str | None, list[str]]]:
        return type(self), (self.problems, self.source, self.notes)  # picklable across processes


def suggest(word: str, candidates: typing.Iterable[str]) -> str:
    """A hint such as "; did you mean 'x'?" naming the closest candidate, or "" when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] and a plain Annotated[...] (not the tagged Step union)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated and not _tags(annotation):
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _tags(annotation: Any) -> dict[str, Any]:
    """For a discriminated union such as models.Step: tag → model class; else {}."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return {}
    union = typing.get_args(annotation)[0]
    out: dict[str, Any] = {}
    for member in typing.get_args(union) if typing.get_origin(union) is typing.Union else ():
        if typing.get_origin(member) is typing.Annotated:
            model, *meta = typing.get_args(member)
            out.update({m.tag: model for m in meta if hasattr(m, "tag")})
    return out


def _step_into(annotation: Any, part: str | int) -> tuple[Any, bool]:
    """The annotation one `loc` part further down, and whether that part is a union tag to drop."""
    annotation = _unwrap(annotation)
    if isinstance(part, str) and part in _tags(annotation):
        return _tags(annotation)[part], True
    origin = typing.get_origin(annotation)
    if origin is list and isinstance(part, int):
        return typing.get_args(annotation)[0], False
    if origin is dict:
        return typing.get_args(annotation)[1], False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
        return annotation.model_fields[part].annotation, False
    return None, False


def _short(name: str) -> str:
    """A name as a path shows it: a name too long to be valid is cut, so a problem stays one line."""
    return name if len(name) <= 64 else name[:20] + "…"


def _format_loc(loc: tuple[str | int, ...], data: Any) -> tuple[str, type[BaseModel] | None]:
    """Readable path such as `tasks[2] (research).for_each`, and the model the last part belongs to."""
    text = ""
    annotation: Any = WorkflowSpec
    node = data
    owner: type[BaseModel] | None = WorkflowSpec
    for part in loc:
        unwrapped = _unwrap(annotation)
        owner = unwrapped if isinstance(unwrapped, type) and issubclass(unwrapped, BaseModel) else None
        annotation, is_tag = _step_into(annotation, part)
        if is_tag:
            continue
        if part == "[key]":  # Pydantic's marker for a bad mapping key
            text += " (name)"
            continue
        if isinstance(part, int) and not isinstance(node, dict):
            node = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            text += f"[{part}]" + (f" ({_short(name)})" if isinstance(name, str) and name else "")
        else:  # a mapping key; Pydantic gives a boolean or number key as an int or a string
            node = node.get(part) if isinstance(node, dict) else None
            text += (f".{part}" if text else part) if isinstance(part, str) and part.isidentifier() else f"[{part!r}]"
    return text, owner


def _message(error: ErrorDetails, owner: type[BaseModel] | None) -> str:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    key = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        known = list(owner.model_fields) if owner is not None else []
        allowed = f" (allowed: {', '.join(known)})" if known else ""
        hint = suggest(str(key), known)
        return f"unknown key {key!r}" + (hint or allowed)
    if kind == "missing":
        return f"missing required key {key!r}"
    if kind == "invalid_key":
        return f"key {value!r} is not text; keys must be text, so put it in quotes"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message[:1].lower() + message[1:]
    if kind.endswith("_type") or kind in ("literal_error", "enum") or kind.startswith(("greater", "less")):
        shown = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
        message += f" (got {shown[:60]})"
    return message


def pydantic_problems(exc: ValidationError, data: Any, source: str | None) -> list[Problem]:
    """One Problem per Pydantic error, with union tags dropped from the path."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "invalid_key":  # Pydantic's loc holds the key as text or int: show it as written
            path, owner = _format_loc(loc[:-1], data)
            path += f"[{error.get('input')!r}]"
        else:
            path, owner = _format_loc(loc, data)
        problems.append(Problem(source, path, _message(error, owner)))
    return problems
