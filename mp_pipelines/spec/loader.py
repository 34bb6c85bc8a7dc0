"""Workflow YAML → WorkflowSpec, with every problem reported at once as file, field path and reason.

A bad file never stops the others: `load_workflows` collects problems per file and loads the rest.
Loading only ever raises WorkflowValidationError: YAML is read with a SafeLoader (no Python tags), files
larger than MP_MAX_SPEC_BYTES are not read, and data nested too deeply, referring to itself or blown
up by YAML aliases is refused before it is validated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mp_pipelines.spec.library import library_folders
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.problems import Problem, WorkflowValidationError, pydantic_problems
from mp_pipelines.spec.salvage import salvage
from mp_pipelines.spec.size_limits import MAX_SPEC_BYTES
from mp_pipelines.spec.subworkflows import call_sites, folder_lookup, resolve_calls
from mp_pipelines.spec.validate import validate_workflow
from mp_pipelines.spec.yaml_guard import MAX_DEPTH, UniqueKeyLoader, shape_problem

__all__ = ["LoadResult", "Problem", "WorkflowValidationError", "load_workflow_file", "load_workflows", "parse_workflow",
           "resolve_callees"]

# The package's workflows folder, found from this file: importing the package itself would tie spec/ to what
# mp_pipelines/__init__.py may import.
SHIPPED_WORKFLOWS_DIR = Path(__file__).parent.parent / "workflows"
WORKFLOW_SUFFIXES = (".yaml", ".yml")
PATH_ENV = "MP_WORKFLOWS_PATH"


def parse_workflow(data: Any, source: str | None = None) -> WorkflowSpec:
    """Validate a workflow's data (structure, then references); WorkflowValidationError lists every problem."""
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
        problems, notes = _every_problem(exc, data, source)
        raise WorkflowValidationError(problems, source, notes) from None
    spec.with_prompt_library(library_folders(source))
    problems = validate_workflow(spec, source)
    if problems:
        raise WorkflowValidationError(problems, source)
    return spec


def _every_problem(exc: ValidationError, data: dict[str, Any], source: str | None) -> tuple[list[Problem], list[str]]:
    """The structure problems, then those the later checks find in what is left once the refused parts are out;
    and a note saying why when those checks cannot run."""
    problems = pydantic_problems(exc, data, source)
    rest = salvage(data, exc)
    if rest.spec is None:
        if not data.get("tasks"):
            return problems, []  # no tasks: nothing for the later checks to look at
        note = (f"{source or 'the workflow'}: references, cycles, templates and answer shapes were not checked "
                f"because {rest.blocker}; fix the problems above and validate again")
        return problems, [note]
    seen = {(p.path, p.message) for p in problems}
    later = validate_workflow(rest.spec.with_prompt_library(library_folders(source)), source, frozenset(rest.uncertain))
    return problems + [p for p in later if (p.path, p.message) not in seen], []


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML file; WorkflowValidationError naming the file, line and column on failure."""
    source = str(path)
    data, repeats = _load_text(_read_text(path, source), source)
    if repeats:
        raise WorkflowValidationError(repeats, source)
    return data


def _read_text(path: str | Path, source: str) -> str:
    """A workflow file's text, within MP_MAX_SPEC_BYTES; WorkflowValidationError when it cannot be read."""
    try:
        MAX_SPEC_BYTES.check(Path(path).stat().st_size, "the workflow file")
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
        raise WorkflowValidationError([Problem(source, "", f"workflow file {reason}")], source) from None
    except ValueError as exc:  # larger than MP_MAX_SPEC_BYTES, or that variable is no number
        raise WorkflowValidationError([Problem(source, "", str(exc))], source) from None


_NOT_READ = "the file could not be read as YAML, so its fields, references and templates were not checked"


def _load_text(text: str, source: str) -> tuple[Any, list[Problem]]:
    """The data of a workflow file's text, and its repeated keys as problems (the later value wins meanwhile)."""
    repeated: list[tuple[int, int, Any]] = []
    try:
        loader = UniqueKeyLoader(text, collect_repeats=True)  # a SafeLoader subclass: as safe as yaml.safe_load
        try:
            data = loader.get_single_data()
            repeated = loader.repeats
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(part for part in (exc.context, exc.problem) if part)
        raise WorkflowValidationError([Problem(source, where, f"invalid YAML: {reason}")], source,
                                      [f"{source}: {_NOT_READ}"]) from None
    except yaml.YAMLError as exc:
        raise WorkflowValidationError([Problem(source, "", f"invalid YAML: {exc}")], source,
                                      [f"{source}: {_NOT_READ}"]) from None
    except RecursionError:  # PyYAML builds nested collections recursively
        message = f"mappings and lists are nested too deeply to read (the limit is {MAX_DEPTH} levels)"
        raise WorkflowValidationError([Problem(source, "", message)], source) from None
    if data is None:
        raise WorkflowValidationError([Problem(source, "", "the file is empty; a workflow needs name and tasks")])
    repeats = [Problem(source, f"line {line}, column {column}", f"invalid YAML: key {key!r} appears twice in one "
                       "mapping; the later value is used for the other checks") for line, column, key in repeated]
    return data, repeats


def load_workflow_file(path: str | Path) -> WorkflowSpec:
    """Read and validate one workflow YAML file; WorkflowValidationError names the file and lists every problem
    (a repeated key included). The workflows its tasks run are found in its folder and the workflow folders."""
    spec = _load_one(path)
    if call_sites(spec):
        problems = resolve_calls({spec.name: spec}, {spec.name: str(path)}, _callee_lookup([Path(path)]))
        if problems:
            raise WorkflowValidationError(problems[spec.name], str(path))
    return spec


def resolve_callees(spec: WorkflowSpec, source: str | None = None) -> WorkflowSpec:
    """`spec` (parsed from data or built in code) with the workflows its tasks run found in the workflow folders (and
    `source`'s folder); WorkflowValidationError when a call is wrong. A spec with callees already is returned as is."""
    sites = call_sites(spec)
    if not sites or all(site.task.workflow in spec._callees for site in sites):
        return spec
    problems = resolve_calls({spec.name: spec}, {spec.name: source}, _callee_lookup([Path(source)] if source else []))
    if problems:
        raise WorkflowValidationError(problems[spec.name], source)
    return spec


def _callee_lookup(paths: Sequence[Path]) -> Callable[[str], tuple[WorkflowSpec, str | None] | None]:
    """Where callees not among the loaded workflows are looked for: the folders of `paths`, then workflow_dirs()."""
    folders = list(dict.fromkeys([*(p if p.is_dir() else p.parent for p in paths), *workflow_dirs()]))

    def load(file: Path) -> WorkflowSpec | None:
        try:
            return _load_one(file)
        except WorkflowValidationError:
            return None

    return folder_lookup(folders, load, WORKFLOW_SUFFIXES)


def _load_one(path: str | Path) -> WorkflowSpec:
    """One workflow file, its calls of other workflows not yet resolved."""
    source = str(path)
    text = _read_text(path, source)
    data, repeats = _load_text(text, source)
    try:
        spec = parse_workflow(data, source=source)
    except WorkflowValidationError as exc:
        raise WorkflowValidationError([*repeats, *exc.problems], source, exc.notes) from None
    if repeats:
        raise WorkflowValidationError(repeats, source)
    return spec


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
    notes: list[str] = field(default_factory=list)  # checks a file's problems kept from running


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
    files = _files(workflow_dirs() if paths is None else paths, result.problems, hint)
    for file in files:
        try:
            spec = _load_one(file)
        except WorkflowValidationError as exc:
            result.problems.extend(exc.problems)
            result.notes.extend(exc.notes)
            continue
        if spec.name in result.specs:
            first = result.sources[spec.name]
            message = f"workflow {spec.name!r} is already defined in {first}; names must be unique, "
            message += "so this file is skipped"
            result.problems.append(Problem(str(file), "name", message))
            continue
        result.specs[spec.name] = spec
        result.sources[spec.name] = file
    if any(call_sites(spec) for spec in result.specs.values()):
        _resolve_calls(result, [Path(p) for p in (workflow_dirs() if paths is None else paths)])
    return result


def _resolve_calls(result: LoadResult, paths: list[Path]) -> None:
    """Attach each workflow's callees; a workflow whose calls are wrong is left out with its problems."""
    sources = {name: str(file) for name, file in result.sources.items()}
    refused = resolve_calls(result.specs, sources, _callee_lookup(paths))
    for name, problems in refused.items():
        result.problems.extend(problems)
        del result.specs[name]
        del result.sources[name]
