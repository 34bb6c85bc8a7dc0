"""Checks across fields and tasks of a parsed WorkflowSpec: names, dependencies, fan-outs, templates, and what
templates read against the shape of each answer (`spec/shapes.py`).

Every check adds Problems instead of raising, so one run reports everything wrong with a file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mp_pipelines.spec import graph, shapes
from mp_pipelines.spec.checks import check_problems
from mp_pipelines.spec.inputs import coerce_input
from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.problems import Problem, suggest
from mp_pipelines.spec.providers import check_models
from mp_pipelines.spec.reads import template_reads
from mp_pipelines.spec.templates import TemplateError

FAN_OUT_INPUT_TYPES = ("list", "table")
# Most tasks a workflow may have, a loop's tasks counted once per iteration since each becomes an op of the
# job. Validation, `show` and building the job grow about linearly up to here (figures in README).
MAX_TASKS = 2_000


@dataclass(frozen=True)
class _Scope:
    """Where a template or dependency sits: which names it may read."""

    path: str
    task: TaskSpec | None = None
    loop: LoopSpec | None = None
    position: int | None = None  # index in the loop body; None for `until` (sees the whole body)
    shared: bool = False  # defaults.system: rendered for every task, so only inputs and workflow

    @property
    def name(self) -> str:
        """The task's or loop's name ("" for defaults)."""
        return self.task.name if self.task is not None else self.loop.name if self.loop is not None else ""


def _known(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


class _Checker:
    """Collects the problems of one spec; one method per kind of check."""

    def __init__(self, spec: WorkflowSpec, source: str | None, uncertain: frozenset[str] = frozenset()) -> None:
        self.spec, self.source = spec, source
        self.uncertain = uncertain  # tasks with fields the structure checks refused: their shape is not known
        self.problems: list[Problem] = []
        # JSON answers without a schema read by attribute: task → attribute → guessed type, and where each is read
        self.schemaless: dict[str, dict[str, str]] = {}
        self.schemaless_reads: list[tuple[int, str, shapes.Finding]] = []
        self.answers = shapes.AnswerShapes(spec, uncertain)
        self.steps = {step.name: step for step in spec.tasks}
        self.owner = {t.name: s for s in spec.tasks if isinstance(s, LoopSpec) for t in s.tasks}  # body → loop
        self.position = {t.name: j for s in spec.tasks if isinstance(s, LoopSpec) for j, t in enumerate(s.tasks)}
        self.paths: dict[str, str] = {}
        self.scopes: list[_Scope] = []
        for i, step in enumerate(spec.tasks):
            path = f"tasks[{i}] ({step.name})"
            self.paths.setdefault(step.name, path)
            if isinstance(step, LoopSpec):
                self.scopes.append(_Scope(path, loop=step))
                for j, task in enumerate(step.tasks):
                    body_path = f"{path}.tasks[{j}] ({task.name})"
                    self.paths.setdefault(task.name, body_path)
                    self.scopes.append(_Scope(body_path, task, step, j))
            else:
                self.scopes.append(_Scope(path, step))

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.source, path, message))

    def run(self) -> list[Problem]:
        """Run every check in file order of the fields they concern; a workflow over MAX_TASKS gets no other check."""
        if self.check_task_count():
            return self.problems
        self.check_unique_names()
        if self.spec.defaults.system:
            self.check_template("defaults.system", self.spec.defaults.system, False, _Scope("defaults", shared=True))
        for scope in self.scopes:
            if scope.task is None:
                self.check_loop(scope)
            else:
                self.check_task(scope)
        self.check_cycles()
        self.check_schedule()
        self.add_schemaless()
        return self.problems

    def add_schemaless(self) -> None:
        """Problems for JSON answers without a schema read by attribute, each with a schema to add."""
        for position, path, finding in reversed(self.schemaless_reads):
            task = finding.schemaless_task or ""
            example = shapes.suggest_schema(self.schemaless.get(task, {}))
            message = f"{finding.message}; add one to task {task!r}, e.g. output_schema: {example}"
            self.problems.insert(position, Problem(self.source, path, message))

    def check_task_count(self) -> bool:
        """Add a problem and return True when the workflow has more than MAX_TASKS tasks."""
        count = sum(len(s.tasks) * graph.loop_iterations(self.spec, s) if isinstance(s, LoopSpec) else 1
                    for s in self.spec.tasks)
        if count <= MAX_TASKS:
            return False
        counted = " (loop tasks counted once per iteration)" if any(isinstance(s, LoopSpec) for s in self.spec.tasks) else ""
        self.add("tasks", f"the workflow has {count:,} tasks{counted}, more than the {MAX_TASKS:,} a workflow may have; "
                 "split it into several workflows")
        return True

    def check_unique_names(self) -> None:
        for scope in self.scopes:
            name = scope.name
            if self.paths[name] != scope.path:
                self.add(f"{scope.path}.name", f"name {name!r} is already used by {self.paths[name]}; "
                         "every task and loop in a workflow needs its own name")

    def check_task(self, scope: _Scope) -> None:
        task = scope.task
        assert task is not None
        for index, name in enumerate(task.depends_on):
            self.check_dependency(f"{scope.path}.depends_on[{index}]", name, scope)
        if task.for_each is not None:
            self.check_for_each(f"{scope.path}.for_each", task, scope)
        for field, source, expression in graph.task_templates(task):
            self.check_template(f"{scope.path}.{field}", source, expression, scope)
        for path, message in check_problems(task.checks, scope.path, task.output_schema):
            self.add(path, message)

    def check_loop(self, scope: _Scope) -> None:
        loop = scope.loop
        assert loop is not None
        for index, name in enumerate(loop.depends_on):
            self.check_dependency(f"{scope.path}.depends_on[{index}]", name, scope)
        limit = loop.loop.max_iterations
        if limit is not None and limit > self.spec.depth:
            self.add(f"{scope.path}.loop.max_iterations", f"max_iterations {limit} is more than the workflow depth "
                     f"{self.spec.depth}, which is the most iterations a loop may run; lower it or raise depth")
        if loop.loop.until:
            self.check_template(f"{scope.path}.loop.until", loop.loop.until, True, scope)

    def body_rule(self, name: str, scope: _Scope) -> str | None:
        """Why `name` (a body task, or the scope's own loop) may not be read here, or None if it may."""
        loop = scope.loop
        if loop is not None and name == loop.name:
            return (f"inside loop {loop.name!r} the loop itself cannot be read; read earlier tasks of the loop "
                    "by name, or the previous iteration as loop.previous.<task>")
        owner = self.owner.get(name)
        if owner is None or name in self.steps:
            return None
        if loop is not None and owner.name == loop.name:
            if scope.position is None or self.position[name] < scope.position:
                return None
            itself = scope.task is not None and name == scope.task.name
            what = "this task itself" if itself else f"a later task of loop {loop.name!r}"
            return (f"{name!r} is {what}; a loop task may read earlier tasks of its loop, "
                    f"and the previous iteration as loop.previous.{name}")
        return f"{name!r} is a task inside loop {owner.name!r}; outside that loop read it as {owner.name}.{name}"

    def check_dependency(self, path: str, name: str, scope: _Scope) -> None:
        owner = self.owner.get(name)
        loop = scope.loop
        if loop is not None and scope.task is not None and (name == loop.name or owner is loop):
            if (reason := self.body_rule(name, scope)) is not None:
                self.add(path, reason)
            return
        if owner is not None and name not in self.steps:
            if owner is loop:
                self.add(path, f"{name!r} is a task of this loop; a loop depends only on steps outside it")
            else:
                self.add(path, f"{name!r} is a task inside loop {owner.name!r}; "
                         f"depend on the loop {owner.name!r} instead")
        elif name not in self.steps:
            known = (set(self.steps) | (self.visible_body(scope) if scope.task is not None else set())) - {scope.name}
            self.add(path, f"unknown step {name!r}; known steps: {_known(known)}{suggest(name, known)}")

    def visible_body(self, scope: _Scope) -> set[str]:
        """Body tasks a template in `scope` may read by name: earlier ones, or all of them in `until`."""
        if scope.loop is None:
            return set()
        end = scope.position if scope.task is not None else None
        return {task.name for task in scope.loop.tasks[:end]}

    def check_for_each(self, path: str, task: TaskSpec, scope: _Scope) -> None:
        if scope.loop is not None:
            self.add(path, f"for_each is not supported inside loop {scope.loop.name!r}; fan out in a top-level "
                     "task that depends on the loop")
            return
        found = graph.for_each_source(task)
        assert found is not None  # only called when the task has for_each
        kind, name = found
        if kind == "input":
            declared = self.spec.inputs.get(name)
            if declared is None:
                self.add(path, f"inputs.{name} is not a declared input; declared inputs: "
                         f"{_known(self.spec.inputs)}{suggest(name, self.spec.inputs)}")
            elif declared.type not in FAN_OUT_INPUT_TYPES:
                self.add(path, f"input {name!r} is a {declared.type}; for_each needs an input of type list or table")
            return
        source = self.steps.get(name)
        if source is None:
            where = (f"{name!r} is a task inside loop {self.owner[name].name!r}" if name in self.owner
                     else f"unknown source {name!r}")
            self.add(path, f"{where}; give a top-level task name or inputs.<name> "
                     f"(tasks: {_known(self.steps)}){suggest(name, self.steps)}")
        elif name in self.uncertain:
            return  # what it answers is not known: some of its fields were refused
        elif isinstance(source, LoopSpec):
            self.add(path, f"{name!r} is a loop, whose output is a mapping, not a list; "
                     "fan out over a task whose output is a list")
        elif source.for_each is None and source.output == "text":
            self.add(path, f"task {name!r} has output: text; fan out over a task with output: json "
                     "that returns a list, or over inputs.<name>")
        elif source.for_each is None and source.output_schema and "type" in source.output_schema:
            kinds = source.output_schema["type"]
            if "array" not in (kinds if isinstance(kinds, list) else [kinds]):
                self.add(path, f"task {name!r} has an output_schema of type {kinds!r}; for_each needs "
                         "a task whose output_schema has type: array")

    def check_template(self, path: str, source: str, expression: bool, scope: _Scope) -> None:
        try:
            refs = graph.template_refs(source, expression=expression)
        except TemplateError as exc:
            self.add(path, str(exc))
            return
        bad = set()
        for name in sorted(refs.names):
            message = self.reference_problem(name, refs, scope)
            if message:
                self.add(path, message)
                bad.add(name)
        if scope.shared:
            return
        found = template_reads(source, expression=expression)
        seen: set[str] = set()
        for read in found.reads:
            if read.root in bad:
                continue
            finding = self.answers.problem(read, found, scope.task, scope.loop)
            if finding is None:
                continue
            if isinstance(finding, shapes.Finding):
                if finding.schemaless_task is not None:
                    kind = shapes.guessed_type(read, expression, found, finding.key_index)
                    self.schemaless.setdefault(finding.schemaless_task, {}).setdefault(finding.key, kind)
                    if finding.message not in seen:
                        self.schemaless_reads.append((len(self.problems), path, finding))
                    seen.add(finding.message)
                    continue
                finding = finding.message
            if finding not in seen:
                seen.add(finding)
                self.add(path, finding)

    def reference_problem(self, name: str, refs: graph.Refs, scope: _Scope) -> str | None:
        """Why a template in `scope` may not read `name`, or None when it may."""
        attrs = refs.attributes.get(name, frozenset())
        if name == "workflow" or (name in graph.JINJA_GLOBALS and name not in self.steps and name not in self.owner):
            return None
        if name == "inputs":
            unknown = sorted(attrs - set(self.spec.inputs))
            return "; ".join(f"inputs.{a} is not a declared input; declared inputs: {_known(self.spec.inputs)}"
                             f"{suggest(a, self.spec.inputs)}" for a in unknown) or None
        if scope.shared:
            return f"defaults.system is used by every task, so it may read only inputs and workflow, not {name!r}"
        if name in ("item", "item_index"):
            if scope.task is not None and scope.task.for_each is not None:
                return None
            return f"{name!r} is only defined in a task with for_each; add for_each: <task> or inputs.<name> to fan out"
        if name == "loop":
            return self.loop_problem(refs, scope)
        if name in self.steps or name in self.owner:
            if (reason := self.body_rule(name, scope)) is not None:
                return reason
            step = self.steps.get(name)
            if isinstance(step, LoopSpec):
                body = {task.name for task in step.tasks}
                missing = sorted(attrs - body)
                return "; ".join(f"{name}.{a}: loop {name!r} has no task {a!r}; its output holds {_known(body)}"
                                 for a in missing) or None
            return None
        if name == "previous":
            return "unknown name 'previous'; inside a loop the previous iteration's outputs are loop.previous.<task>"
        allowed = ["inputs.<name>", "a task or loop by name", "workflow"]
        allowed += ["item", "item_index"] if scope.task is not None and scope.task.for_each else []
        allowed += ["loop"] if scope.loop is not None else []
        candidates = set(self.steps) | self.visible_body(scope) | {"inputs", "workflow"}
        return f"unknown name {name!r}; a template here can read {', '.join(allowed)}{suggest(name, candidates)}"

    def loop_problem(self, refs: graph.Refs, scope: _Scope) -> str | None:
        loop = scope.loop
        if loop is None:
            return ("'loop' is only defined in the tasks of a loop "
                    f"({', '.join(f'loop.{a}' for a in sorted(graph.LOOP_ATTRIBUTES))})")
        unknown = sorted(refs.attributes.get("loop", frozenset()) - graph.LOOP_ATTRIBUTES)
        reasons = [f"loop.{a} is not defined; a loop task can read loop.iteration, loop.max_iterations and "
                   "loop.previous.<task>" for a in unknown]
        body = [task.name for task in loop.tasks]
        reasons += [f"loop.previous.{a}: {a!r} is not a task of loop {loop.name!r}; its tasks are {_known(body)}"
                    f"{suggest(a, body)}" for a in sorted(refs.previous - set(body))]
        return "; ".join(reasons) or None

    def check_cycles(self) -> None:
        cycle = graph.find_cycle(graph.step_dependencies(self.spec))
        if cycle:
            what = f"{cycle[0]!r} depends on itself" if len(cycle) == 2 else f"dependency cycle {graph.describe_cycle(cycle)}"
            self.add(self.paths[cycle[0]], f"{what}; steps must form a DAG, so repeat work with a loop: block instead")

    def check_schedule(self) -> None:
        schedule = self.spec.schedule
        if schedule is None:
            return
        inputs = self.spec.inputs
        for name, value in schedule.inputs.items():
            path = f"schedule.inputs.{name}"
            if name not in inputs:
                self.add(path, f"unknown input {name!r}; declared inputs: {_known(inputs)}{suggest(name, inputs)}")
                continue
            try:
                coerce_input(inputs[name].type, value, name, check_size=False)
            except ValueError as exc:
                self.add(path, str(exc))
        if schedule.enabled:
            for name in [n for n, spec in inputs.items() if spec.required and n not in schedule.inputs]:
                self.add("schedule.inputs", f"input {name!r} has no default, so an enabled schedule must set it")


def validate_workflow(spec: WorkflowSpec, source: str | None = None,
                      uncertain: frozenset[str] = frozenset()) -> list[Problem]:
    """Every cross-field problem of a parsed spec (empty when it is valid), each with a field path.

    `uncertain` names tasks some of whose fields were dropped as invalid: what they answer is not checked.
    """
    return _Checker(spec, source, uncertain).run() + check_models(spec, source)
