"""Sub-workflows: a task that runs another workflow (`workflow: <name>`, `inputs:`), checked across workflows.

A callee is found by name among the workflows loaded together with the caller (the folders or files given to
`load_workflows`); failing that, among the caller file's own folder and the workflow folders (the shipped ones
and MP_WORKFLOWS_PATH). Every problem is said as the caller's file, the call task's field path and the reason:
an unknown workflow, inputs the callee does not declare, lacks or cannot take, a callee with several final tasks
and no `outputs:`, a call that runs itself (directly or through others), or calls nested deeper than
MAX_CALL_DEPTH. Every walk over the call graph uses its own stack, never Python recursion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_pipelines.spec.graph import describe_cycle, find_cycle, order_steps, step_dependencies
from mp_pipelines.spec.inputs import coerce_input
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.problems import Problem, suggest

# Most workflows nested in one another (a calling b calling c is 3); a job nests one graph per level.
MAX_CALL_DEPTH = 8
# `{{ inputs.name }}` alone: the value passes as it is, so its declared type is known.
_INPUT_ONLY = re.compile(r"^\s*\{\{\s*inputs\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")
_TASK_ONLY = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")
_SCALARS = frozenset({"string", "integer", "number", "boolean"})


@dataclass(frozen=True)
class CallSite:
    """One task of `caller` that runs workflow `task.workflow`, at field path `path`."""

    caller: str
    task: TaskSpec
    path: str


def call_sites(spec: WorkflowSpec) -> list[CallSite]:
    """The top-level tasks of `spec` that run a workflow, in file order (a loop's may not: validate.py says so)."""
    return [CallSite(spec.name, step, f"tasks[{index}] ({step.name})") for index, step in enumerate(spec.tasks)
            if isinstance(step, TaskSpec) and step.workflow is not None]


def sinks(spec: WorkflowSpec) -> list[str]:
    """Top-level steps no other step runs after, in file order."""
    dependencies = step_dependencies(spec)
    needed = {upstream for ups in dependencies.values() for upstream in ups}
    return [name for name in dependencies if name not in needed]


def result_steps(spec: WorkflowSpec) -> dict[str, str] | str | None:
    """What a caller gets from `spec`: its `outputs:` map (name → step), else its only final step, else None."""
    if spec.outputs:
        return dict(spec.outputs)
    final = sinks(spec)
    return final[0] if len(final) == 1 else None


def fans_out(spec: WorkflowSpec) -> bool:
    """Whether the workflow itself has a for_each task."""
    return any(task.for_each is not None for task in spec.all_tasks())


def single_expression(value: Any) -> str | None:
    """The expression of a value written as one `{{ … }}` and nothing else (it passes with its own type)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not (text.startswith("{{") and text.endswith("}}")) or "{{" in text[2:] or "}}" in text[:-2]:
        return None
    if "{%" in text or "{#" in text:
        return None
    return text[2:-2].strip()


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _type_of(caller: WorkflowSpec, value: Any) -> str | None:
    """The type a templated input value has when that is known without running: `{{ inputs.x }}` (x's declared
    type) or `{{ fan_out_task }}` (a list)."""
    if not isinstance(value, str):
        return None
    found = _INPUT_ONLY.match(value)
    if found:
        declared = caller.inputs.get(found.group(1))
        return declared.type if declared is not None else None
    found = _TASK_ONLY.match(value)
    if found:
        try:
            step = caller.step(found.group(1))
        except KeyError:
            return None
        if isinstance(step, TaskSpec) and step.for_each is not None:
            return "list"
    return None


def _compatible(given: str, wanted: str) -> bool:
    if given == wanted or wanted == "string" and given in _SCALARS:
        return True
    if given in _SCALARS and wanted in _SCALARS:
        return given == "string" or wanted == "number" and given == "integer"
    if given == "string":  # a text may name a table's path, or list items separated by commas
        return wanted in ("table", "list")
    return False


def _known(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


def check_call(caller: WorkflowSpec, site: CallSite, callee: WorkflowSpec, callee_source: str | None,
               source: str | None) -> list[Problem]:
    """What is wrong with one call of `callee` from `caller` (inputs, result), as problems of the caller's file."""
    task, problems = site.task, []
    where = f"workflow {callee.name!r}" + (f" ({callee_source})" if callee_source else "")

    def add(path: str, message: str) -> None:
        problems.append(Problem(source, path, message))

    for name, value in task.inputs.items():
        path = f"{site.path}.inputs.{name}"
        declared = callee.inputs.get(name)
        if declared is None:
            add(path, f"{where} has no input {name!r}; its inputs: {_known(callee.inputs)}{suggest(name, callee.inputs)}")
            continue
        if not is_template(value):
            try:
                coerce_input(declared.type, value, name, check_size=False)
            except ValueError as exc:
                add(path, f"{exc} (the type {where} declares)")
            continue
        given = _type_of(caller, value)
        if given is not None and not _compatible(given, declared.type):
            add(path, f"{value.strip()} is a {given}, but input {name!r} of {where} is a {declared.type}")
    for name, declared in callee.inputs.items():
        if declared.required and name not in task.inputs:
            add(f"{site.path}.inputs", f"{where} needs input {name!r} ({declared.type}, no default); "
                f"pass it as inputs: {{{name}: ...}}")
    if result_steps(callee) is None:
        add(f"{site.path}.workflow", f"{where} has several final tasks ({', '.join(sinks(callee))}) and no outputs:, "
            "so what it returns is not clear; declare outputs: (name: task) in it")
    if task.for_each is not None:
        loops = [step.name for step in callee.tasks if isinstance(step, LoopSpec)]
        if loops:
            add(f"{site.path}.for_each", f"task {task.name!r} runs {where} once per item inside its own steps, which "
                f"cannot run its loop {loops[0]!r}; call it without for_each, or move the loop out of {callee.name!r}")
    return problems


def resolve_calls(targets: Mapping[str, WorkflowSpec], sources: Mapping[str, str | None],
                  find: Callable[[str], tuple[WorkflowSpec, str | None] | None]) -> dict[str, list[Problem]]:
    """Check every call of the `targets` workflows and attach their callees (transitively); the problems of each
    target whose calls are wrong, by name (a target with problems gets no callees).

    `find(name)` looks a workflow up beyond the targets; a target whose callee has problems of its own is
    refused too, since its job could not be built.
    """
    known: dict[str, WorkflowSpec] = dict(targets)
    known_sources: dict[str, str | None] = dict(sources)
    missing: set[str] = set()
    # Walk every workflow reachable through calls, with a worklist (a chain of any length costs no recursion).
    pending = list(targets)
    while pending:
        name = pending.pop()
        for site in call_sites(known[name]):
            wanted = site.task.workflow
            assert wanted is not None
            if wanted in known or wanted in missing:
                continue
            found = find(wanted)
            if found is None:
                missing.add(wanted)
                continue
            known[wanted], known_sources[wanted] = found
            pending.append(wanted)
    calls = {name: sorted({s.task.workflow for s in call_sites(spec) if s.task.workflow in known})
             for name, spec in known.items()}
    problems: dict[str, list[Problem]] = {name: [] for name in known}
    for name, spec in known.items():
        source = known_sources.get(name)
        for site in call_sites(spec):
            wanted = site.task.workflow
            assert wanted is not None
            if wanted not in known:
                problems[name].append(Problem(source, f"{site.path}.workflow", f"unknown workflow {wanted!r}; known "
                                              f"workflows: {_known(known)}{suggest(wanted, known)}"))
            elif wanted == name:
                problems[name].append(Problem(source, f"{site.path}.workflow", f"workflow {name!r} runs itself; a "
                                              "workflow may not call itself, directly or through others"))
            else:
                problems[name] += check_call(spec, site, known[wanted], known_sources.get(wanted), source)
    _check_cycles(known, known_sources, calls, problems)
    _check_depth(known, known_sources, calls, problems)
    # A workflow whose callee (or its callee ...) has problems cannot be built either.
    broken = {name for name, found in problems.items() if found}
    callers: dict[str, list[str]] = {name: [] for name in known}
    for name, callees in calls.items():
        for callee in callees:
            callers[callee].append(name)
    pending = sorted(broken)
    while pending:
        bad = pending.pop()
        for caller in callers[bad]:
            if caller in broken:
                continue
            broken.add(caller)
            pending.append(caller)
            site = next(s for s in call_sites(known[caller]) if s.task.workflow == bad)
            reason = problems[bad][0] if problems[bad] else None
            problems[caller].append(Problem(known_sources.get(caller), f"{site.path}.workflow",
                                            f"workflow {bad!r} cannot run: " + (str(reason) if reason else
                                            "a workflow it calls has problems")))
    for name, spec in known.items():
        if name not in broken:
            spec.with_callees({callee: known[callee] for callee in calls[name]},
                              {callee: _folder_of(known_sources.get(callee)) for callee in calls[name]})
            spec.in_folder(_folder_of(known_sources.get(name)))
    return {name: problems[name] for name in targets if problems[name]}


def _folder_of(source: str | None) -> str | None:
    return str(Path(source).resolve().parent) if source else None


def _check_cycles(known: Mapping[str, WorkflowSpec], sources: Mapping[str, str | None], calls: dict[str, list[str]],
                  problems: dict[str, list[Problem]]) -> None:
    """A problem for each workflow on a cycle of calls (a workflow calling itself is said by resolve_calls)."""
    rest = {name: [c for c in callees if c != name] for name, callees in calls.items()}
    while True:
        cycle = find_cycle(rest)
        if cycle is None:
            return
        for position, name in enumerate(cycle[:-1]):
            nxt = cycle[position + 1]
            site = next(s for s in call_sites(known[name]) if s.task.workflow == nxt)
            turned = [*cycle[position:-1], *cycle[:position], name]
            problems[name].append(Problem(sources.get(name), f"{site.path}.workflow",
                                          f"workflow {name!r} runs itself through other workflows: "
                                          f"{describe_cycle(turned)}; a workflow may not call itself"))
            rest[name] = [c for c in rest[name] if c != nxt]  # this edge is said; look for other cycles


def _check_depth(known: Mapping[str, WorkflowSpec], sources: Mapping[str, str | None], calls: dict[str, list[str]],
                 problems: dict[str, list[Problem]]) -> None:
    """A problem for each workflow whose calls nest deeper than MAX_CALL_DEPTH (levels counted in workflows)."""
    acyclic = {name: [c for c in callees if c != name] for name, callees in calls.items()}
    try:
        order = order_steps(acyclic)  # callees before their callers
    except ValueError:
        return  # cycles are said already
    depth: dict[str, int] = {}
    for name in order:
        depth[name] = 1 + max((depth[c] for c in acyclic[name]), default=0)
    for name in order:
        if depth[name] <= MAX_CALL_DEPTH or any(depth[c] > MAX_CALL_DEPTH for c in acyclic[name]):
            continue  # said once, where the chain first gets too deep
        deepest = max(acyclic[name], key=lambda c: depth[c])
        site = next(s for s in call_sites(known[name]) if s.task.workflow == deepest)
        problems[name].append(Problem(sources.get(name), f"{site.path}.workflow",
                                      f"workflows nest {depth[name]} levels deep through {deepest!r}, more than the "
                                      f"{MAX_CALL_DEPTH} allowed; flatten the chain"))


def folder_lookup(folders: list[Path], load: Callable[[Path], WorkflowSpec | None],
                  suffixes: tuple[str, ...]) -> Callable[[str], tuple[WorkflowSpec, str | None] | None]:
    """`find(name)` for resolve_calls over workflow files in `folders`, each read at most once and only when a
    name is not found among those read so far."""
    found: dict[str, tuple[WorkflowSpec, str]] = {}
    files = iter([file for folder in folders if folder.is_dir()
                  for file in sorted(folder.iterdir()) if file.suffix in suffixes and file.is_file()])

    def find(name: str) -> tuple[WorkflowSpec, str | None] | None:
        while name not in found:
            file = next(files, None)
            if file is None:
                return None
            spec = load(file)
            if spec is not None and spec.name not in found:
                found[spec.name] = (spec, str(file))
        return found[name]

    return find
