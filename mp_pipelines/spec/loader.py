"""Workflow YAML → WorkflowSpec, with every problem reported at once as file, field path and reason.

A bad file never stops the others: `load_workflows` collects problems per file and loads the rest.
Loading only ever raises WorkflowValidationError: YAML is read with a SafeLoader (no Python tags), files
larger than MP_MAX_SPEC_BYTES are not read, and data nested too deeply, referring to itself or blown
up by YAML aliases is refused before it is validated.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

import mp_pipelines
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.size_limits import MAX_SPEC_BYTES
from mp_pipelines.spec.yaml_guard import MAX_DEPTH, UniqueKeyLoader, shape_problem

SHIPPED_WORKFLOWS_DIR = Path(mp_pipelines.__file__).parent / "workflows"
WORKFLOW_SUFFIXES = (".yaml", ".yml")
PATH_ENV = "MP_WORKFLOWS_PATH"


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

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source if source is not None else next((p.file for p in self.problems if p.file), None)
        count = len(self.problems)
        summary = f"{count} problem{'s' if count != 1 else ''} in {self.source or 'workflow spec'}"
        super().__init__("\n".join([summary, *(f"  {problem}" for problem in self.problems)]))

    def __reduce__(self) -> tuple[type[WorkflowValidationError], tuple[list[Problem], str | None]]:
        return type(self), (self.problems, self.source)  # picklable across processes


def suggest(word: str, candidates: typing.Iterable[str]) -> str:
    """A hint such as "; did you mean 'x'?" naming the closest candidate, or "" when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


# --- Pydantic errors → Problems ------------------------------------------------------------------


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
            text += f"[{part}]" + (f" ({name})" if isinstance(name, str) and name else "")
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


# --- Parsing and loading -------------------------------------------------------------------------


def parse_workflow(data: Any, source: str | None = None) -> WorkflowSpec:
    """Validate a workflow's data (structure, then references); WorkflowValidationError lists every problem."""
    from mp_pipelines.spec.validate import validate_workflow  # local: validate imports Problem from here

    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise WorkflowValidationError(
            [Problem(source, "", f"a workflow must be a mapping with name and tasks, but this is {kind}")], source
        )
    shape = shape_problem(data)
    if shape:
        raise WorkflowValidationError([Problem(source, "", shape)], source)
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise WorkflowValidationError(pydantic_problems(exc, data, source), source) from None
    problems = validate_workflow(spec, source)
    if problems:
        raise WorkflowValidationError(problems, source)
    return spec


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML file; WorkflowValidationError naming the file, line and column on failure."""
    source = str(path)
    try:
        MAX_SPEC_BYTES.check(Path(path).stat().st_size, "the workflow file")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
        raise WorkflowValidationError([Problem(source, "", f"workflow file {reason}")], source) from None
    except ValueError as exc:  # larger than MP_MAX_SPEC_BYTES, or that variable is no number
        raise WorkflowValidationError([Problem(source, "", str(exc))], source) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: as safe as yaml.safe_load
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(part for part in (exc.context, exc.problem) if part)
        raise WorkflowValidationError([Problem(source, where, f"invalid YAML: {reason}")], source) from None
    except yaml.YAMLError as exc:
        raise WorkflowValidationError([Problem(source, "", f"invalid YAML: {exc}")], source) from None
    except RecursionError:  # PyYAML builds nested collections recursively
        message = f"mappings and lists are nested too deeply to read (the limit is {MAX_DEPTH} levels)"
        raise WorkflowValidationError([Problem(source, "", message)], source) from None
    if data is None:
        raise WorkflowValidationError([Problem(source, "", "the file is empty; a workflow needs name and tasks")])
    return data


def load_workflow_file(path: str | Path) -> WorkflowSpec:
    """Read and validate one workflow YAML file; WorkflowValidationError names the file."""
    return parse_workflow(read_yaml(path), source=str(path))


def workflow_dirs() -> list[Path]:
    """The shipped workflows folder, then every folder in MP_WORKFLOWS_PATH (os.pathsep-separated)."""
    extra = [Path(entry) for entry in os.environ.get(PATH_ENV, "").split(os.pathsep) if entry.strip()]
    return [SHIPPED_WORKFLOWS_DIR, *extra]


@dataclass
class LoadResult:
    """Workflows loaded by name, the file each came from, and every problem met on the way."""

    specs: dict[str, WorkflowSpec] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _files(paths: Sequence[str | Path], problems: list[Problem], hint: str) -> list[Path]:
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files.extend(sorted(p for p in entry.iterdir() if p.suffix in WORKFLOW_SUFFIXES and p.is_file()))
        elif entry.is_file():
            files.append(entry)
        else:
            where = hint if entry != SHIPPED_WORKFLOWS_DIR else ""
            problems.append(Problem(str(entry), "", f"workflow folder or file does not exist{where}"))
    return files


def load_workflows(paths: Sequence[str | Path] | None = None) -> LoadResult:
    """Load every workflow file in `paths` (files or folders; default workflow_dirs()), collecting problems."""
    result = LoadResult()
    hint = f" (folders come from {PATH_ENV})" if paths is None else ""
    for file in _files(workflow_dirs() if paths is None else paths, result.problems, hint):
        try:
            spec = load_workflow_file(file)
        except WorkflowValidationError as exc:
            result.problems.extend(exc.problems)
            continue
        if spec.name in result.specs:
            first = result.sources[spec.name]
            message = f"workflow {spec.name!r} is already defined in {first}; names must be unique, "
            message += "so this file is skipped"
            result.problems.append(Problem(str(file), "name", message))
            continue
        result.specs[spec.name] = spec
        result.sources[spec.name] = file
    return result
