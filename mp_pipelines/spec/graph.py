"""Dependencies between a workflow's steps, read from `depends_on`, `for_each` and templates.

Pure functions over a WorkflowSpec: the job factory wires ops from them, `validate.py` checks them.
A *step* is a top-level entry of `spec.tasks` (a TaskSpec or a LoopSpec); a loop's output is a
mapping of its body tasks' latest outputs, so outside a loop its tasks are read as `<loop>.<task>`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from jinja2 import nodes

from mp_pipelines.spec.models import LoopSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.templates import JINJA_GLOBALS, NESTED_TOO_DEEPLY, TemplateError, as_template, parsed, references

__all__ = ["JINJA_GLOBALS"]  # names Jinja itself defines (range, dict, lipsum, ...): not references to the context
LOOP_ATTRIBUTES = frozenset({"iteration", "max_iterations", "previous"})


@dataclass(frozen=True)
class Refs:
    """What one template reads: free names, their first attributes, and `loop.previous.<name>` names."""

    names: frozenset[str] = frozenset()
    attributes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    previous: frozenset[str] = frozenset()


def template_refs(source: str, *, expression: bool = False) -> Refs:
    """References of a template (or a condition, with `expression=True`); TemplateError on bad syntax."""
    found = references(source, expression=expression)
    attributes = dict(found.attributes)
    previous: set[str] = set()
    if "loop" in found.names:
        # Inside `{% for %}` Jinja's own `loop` shadows ours, so read its chains scope-aware.
        tree = parsed(as_template(source) if expression else source)
        loop_attrs: set[str] = set()
        try:
            chains = list(_loop_chains(tree, shadowed=False))
        except RecursionError:
            raise TemplateError(NESTED_TOO_DEEPLY) from None
        for chain in chains:
            loop_attrs.add(chain[0])
            if chain[0] == "previous" and len(chain) > 1:
                previous.add(chain[1])
        attributes["loop"] = frozenset(loop_attrs)
    return Refs(found.names, attributes, frozenset(previous))


def _loop_chains(node: nodes.Node, *, shadowed: bool) -> Iterator[tuple[str, ...]]:
    """Constant attribute chains read from the workflow's `loop` (not a Jinja for-loop's `loop`)."""
    if isinstance(node, nodes.For):
        for child in (node.target, node.iter, node.test, *node.else_):
            if child is not None:
                yield from _loop_chains(child, shadowed=shadowed)
        for child in node.body:
            yield from _loop_chains(child, shadowed=True)
        return
    if isinstance(node, (nodes.Getattr, nodes.Getitem)) and not shadowed:
        chain = _chain(node)
        if chain and chain[0] == "loop" and len(chain) > 1:
            yield chain[1:]
            return
    for child in node.iter_child_nodes():
        yield from _loop_chains(child, shadowed=shadowed)


def _chain(node: nodes.Node) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(node, (nodes.Getattr, nodes.Getitem)):
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if not isinstance(key, str):
            parts.clear()  # a dynamic key: only the part of the chain above it is constant
        else:
            parts.append(key)
        node = node.node
    return (node.name, *reversed(parts)) if isinstance(node, nodes.Name) else None


def task_templates(task: TaskSpec) -> list[tuple[str, str, bool]]:
    """(field, source, is_expression) for every template field a task sets."""
    fields = [("prompt", task.prompt, False), ("system", task.system, False), ("when", task.when, True)]
    # A called workflow's inputs are templates too: what they read is what the call depends on.
    fields += [(f"inputs.{name}", value, False) for name, value in task.inputs.items() if isinstance(value, str)]
    return [(name, source, expression) for name, source, expression in fields if source]


def _safe_names(source: str, expression: bool) -> frozenset[str]:
    # Unparsable templates contribute no edges; validate_workflow reports them on their own.
    try:
        return references(source, expression=expression).names
    except TemplateError:
        return frozenset()


def _task_names(task: TaskSpec) -> set[str]:
    names: set[str] = set(task.depends_on)
    for _, source, expression in task_templates(task):
        names |= _safe_names(source, expression)
    return names


def for_each_source(task: TaskSpec) -> tuple[Literal["input", "step"], str] | None:
    """What a task fans out over: ("input", name) for `inputs.<name>`, ("step", name) otherwise."""
    if task.for_each is None:
        return None
    text = task.for_each.strip()
    if text.startswith("inputs."):
        return "input", text.removeprefix("inputs.")
    return "step", text


def step_names(spec: WorkflowSpec) -> list[str]:
    """Names of the top-level steps, in file order."""
    return [step.name for step in spec.tasks]


def loop_iterations(spec: WorkflowSpec, loop: LoopSpec) -> int:
    """How many times a loop may run: its max_iterations, never more than the workflow's depth."""
    return min(loop.loop.max_iterations or spec.depth, spec.depth)


def until_gate(loop: LoopSpec) -> int:
    """Index of the body task after which `until` is checked: the last body task it reads, else the last task."""
    names = _safe_names(loop.loop.until, True) if loop.loop.until else frozenset()
    read = [index for index, task in enumerate(loop.tasks) if task.name in names]
    return max(read) if read else len(loop.tasks) - 1


def body_dependencies(loop: LoopSpec, step_names: set[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Each body task → (top-level steps it reads, sorted; earlier body tasks it reads, in body order).

    The top-level steps `until` reads count as read by the until_gate task, the op that evaluates `until`.
    """
    gate = until_gate(loop)
    out: dict[str, tuple[list[str], list[str]]] = {}
    for position, task in enumerate(loop.tasks):
        names = _task_names(task)
        until = _safe_names(loop.loop.until, True) if position == gate and loop.loop.until else frozenset()
        external = sorted(((names | until) & step_names) - {loop.name})
        earlier = [other.name for other in loop.tasks[:position] if other.name in names]
        out[task.name] = (external, earlier)
    return out


def step_dependencies(spec: WorkflowSpec) -> dict[str, list[str]]:
    """Every top-level step → the sorted top-level steps it runs after."""
    names = set(step_names(spec))
    deps: dict[str, list[str]] = {}
    for step in spec.tasks:
        if isinstance(step, LoopSpec):
            found = set(step.depends_on) & names
            for external, _ in body_dependencies(step, names).values():  # `until` included
                found.update(external)
        else:
            found = _task_names(step) & names
            source = for_each_source(step)
            if source is not None and source[0] == "step" and source[1] in names:
                found.add(source[1])
        deps[step.name] = sorted(found)
    return deps


def find_cycle(deps: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A dependency cycle such as ["a", "b", "a"], or None; edges to unknown names are ignored.

    Depth-first with its own stack, so a chain of any length costs no Python recursion.
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in deps:
        if root in state:
            continue
        state[root] = 1
        path, pending = [root], [iter(deps[root])]
        while pending:
            upstream = next(pending[-1], None)
            if upstream is None:
                state[path.pop()] = 2
                pending.pop()
            elif upstream in deps and state.get(upstream) == 1:
                return [*path[path.index(upstream):], upstream]
            elif upstream in deps and upstream not in state:
                state[upstream] = 1
                path.append(upstream)
                pending.append(iter(deps[upstream]))
    return None


def describe_cycle(cycle: list[str]) -> str:
    """A cycle as `a -> b -> a (each step needs the next)`; a long one shows its ends and its length."""
    if len(cycle) <= 9:
        return f"{' -> '.join(cycle)} (each step needs the next)"
    shown = [*cycle[:4], "…", *cycle[-3:]]
    return f"{' -> '.join(shown)} ({len(cycle) - 1:,} steps, each needing the next)"


def order_steps(deps: Mapping[str, Iterable[str]]) -> list[str]:
    """Steps so that each follows its upstreams; among ready steps, the one first in `deps` wins.

    ValueError naming a cycle when there is one. Kahn's algorithm with a heap of ready positions:
    O((steps + edges) log steps), so a long chain costs no more per step than a short one.
    """
    names = list(deps)
    position = {name: index for index, name in enumerate(names)}
    waiting = {name: 0 for name in names}
    downstream: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for upstream in set(deps[name]) & position.keys():
            waiting[name] += 1
            downstream[upstream].append(name)
    ready = [position[name] for name in names if not waiting[name]]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for later in downstream[name]:
            waiting[later] -= 1
            if not waiting[later]:
                heapq.heappush(ready, position[later])
    if len(order) < len(names):
        stuck = {name: deps[name] for name in names if waiting[name]}
        raise ValueError(f"dependency cycle {describe_cycle(find_cycle(stuck) or list(stuck))}")
    return order


def topological_order(spec: WorkflowSpec, deps: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Top-level steps so that each follows its upstreams; among ready steps, file order wins.

    `deps` is `step_dependencies(spec)` when the caller has it already.
    """
    try:
        return order_steps(step_dependencies(spec) if deps is None else deps)
    except ValueError as exc:
        raise ValueError(f"workflow {spec.name!r} has a {exc}") from None
