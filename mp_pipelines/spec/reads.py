"""What a template reads, path by path: `critique.issues`, `item.urgency`, `loop.previous.revise`, and whether
each read is guarded (`| default(...)`, `is defined`, or for `loop.previous` a test of it), for `spec/shapes.py`.

A `{% for x in task %}` variable stands for an element of what it iterates, so `x.field` is read as
`task[*].field`; names a template sets itself (`{% set %}`, macro arguments) are not followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from jinja2 import nodes

from mp_pipelines.spec.templates import NESTED_TOO_DEEPLY, TemplateError, as_template, parsed

EACH = "[*]"  # an element of a list, as a `for` loop or a dynamic index reads it
Key = Union[str, int]  # an attribute (str), a constant index (int), or EACH
GUARD_FILTERS = frozenset({"default", "d"})
GUARD_TESTS = frozenset({"defined", "undefined", "none"})


@dataclass(frozen=True)
class Read:
    """One path a template reads from its context, such as ("critique", ("issues",))."""

    root: str
    path: tuple[Key, ...]
    guarded: bool = False  # under `| default(...)` or `is defined`: a missing value does not fail the render
    iterated: bool = False  # the path is what a `for` loop iterates

    @property
    def text(self) -> str:
        """The path as a template would write it: `critique.issues[*]`."""
        out = self.root
        for key in self.path:
            out += f".{key}" if isinstance(key, str) and key != EACH else f"[{'*' if key == EACH else key}]"
        return out


@dataclass(frozen=True)
class TemplateReads:
    """Every read of a template, and the paths its `if` tests and conditional expressions look at."""

    reads: tuple[Read, ...]
    tested: frozenset[tuple[str, tuple[Key, ...]]]  # (root, path) read in an if test or `a if test else b`


@lru_cache(maxsize=4096)
def template_reads(source: str, *, expression: bool = False) -> TemplateReads:
    """The reads of a template (or a condition with `expression=True`); TemplateError on bad syntax."""
    tree = parsed(as_template(source) if expression else source)
    walker = _Walker()
    try:
        walker.visit(tree, {}, guarded=False)
    except RecursionError:
        raise TemplateError(NESTED_TOO_DEEPLY) from None
    defined = walker.defined
    reads = []
    for read in walker.reads:
        full = (read.root, read.path)
        if not read.guarded and any(full[0] == root and full[1][:len(path)] == path for root, path in defined):
            read = Read(read.root, read.path, True, read.iterated)
        reads.append(read)
    return TemplateReads(tuple(reads), frozenset(walker.tested))


Alias = Union[tuple[str, tuple[Key, ...]], None]  # what a local name stands for; None: nothing to follow


class _Walker:
    """Walks a Jinja tree once, following `for` variables to what they iterate."""

    def __init__(self) -> None:
        self.reads: list[Read] = []
        self.defined: set[tuple[str, tuple[Key, ...]]] = set()
        self.tested: set[tuple[str, tuple[Key, ...]]] = set()
        self.in_test = 0

    def chain(self, node: nodes.Node, env: dict[str, Alias]) -> tuple[tuple[str, tuple[Key, ...]] | None, list[nodes.Node]]:
        """(root, path) of an attribute/index chain (None when it starts elsewhere) and its dynamic index nodes."""
        keys: list[Key] = []
        dynamic: list[nodes.Node] = []
        while isinstance(node, (nodes.Getattr, nodes.Getitem)):
            if isinstance(node, nodes.Getattr):
                keys.append(node.attr)
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, (str, int)) \
                    and not isinstance(node.arg.value, bool):
                keys.append(node.arg.value)
            else:
                keys.append(EACH)
                dynamic.append(node.arg)
            node = node.node
        if not isinstance(node, nodes.Name):
            dynamic.append(node)
            return None, dynamic
        keys.reverse()
        if node.name in env:
            alias = env[node.name]
            return ((alias[0], alias[1] + tuple(keys)) if alias is not None else None), dynamic
        return (node.name, tuple(keys)), dynamic

    def emit(self, node: nodes.Node, env: dict[str, Alias], *, guarded: bool, iterated: bool = False) -> None:
        found, dynamic = self.chain(node, env)
        if found is not None:
            self.reads.append(Read(found[0], found[1], guarded, iterated))
            if self.in_test:
                self.tested.add(found)
        for child in dynamic:
            self.visit(child, env, guarded=False)

    def visit(self, node: nodes.Node, env: dict[str, Alias], *, guarded: bool) -> None:
        if isinstance(node, (nodes.Name, nodes.Getattr, nodes.Getitem)):
            if isinstance(node, nodes.Name) and node.ctx != "load":
                return
            self.emit(node, env, guarded=guarded)
            return
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):  # x.method(...): x is read
            self.visit(node.node.node, env, guarded=guarded)
            for child in (*node.args, *node.kwargs, node.dyn_args, node.dyn_kwargs):
                if child is not None:
                    self.visit(child, env, guarded=False)
            return
        if isinstance(node, nodes.Filter) and node.name in GUARD_FILTERS and node.node is not None:
            self.visit(node.node, env, guarded=True)
            for child in (*node.args, *node.kwargs):
                self.visit(child, env, guarded=False)
            return
        if isinstance(node, nodes.Test) and node.name in GUARD_TESTS:
            found, _ = self.chain(node.node, env)
            if found is not None:
                self.defined.add(found)
            self.visit(node.node, env, guarded=True)
            return
        if isinstance(node, nodes.For):
            self.visit_for(node, env)
            return
        if isinstance(node, (nodes.If, nodes.CondExpr)):
            self.in_test += 1
            self.visit(node.test, env, guarded=guarded)
            self.in_test -= 1
            for name, child in node.iter_fields():
                if name != "test":
                    self.visit_field(child, env, guarded)
            return
        if isinstance(node, (nodes.Macro, nodes.CallBlock)):
            return  # macro bodies read their own arguments; not followed
        for child in node.iter_child_nodes():
            self.visit(child, env, guarded=False)

    def visit_field(self, value: object, env: dict[str, Alias], guarded: bool) -> None:
        if isinstance(value, nodes.Node):
            self.visit(value, env, guarded=guarded)
        elif isinstance(value, list):
            for child in value:
                if isinstance(child, nodes.Node):
                    self.visit(child, env, guarded=guarded)

    def visit_for(self, node: nodes.For, env: dict[str, Alias]) -> None:
        found, dynamic = self.chain(node.iter, env) if isinstance(node.iter, (nodes.Name, nodes.Getattr,
                                                                             nodes.Getitem)) else (None, [])
        if found is not None:
            self.reads.append(Read(found[0], found[1], False, True))
            for child in dynamic:
                self.visit(child, env, guarded=False)
        else:
            self.visit(node.iter, env, guarded=False)
        inner: dict[str, Alias] = {**env, "loop": None}  # Jinja's own loop variable
        targets = [node.target] if isinstance(node.target, nodes.Name) else list(node.target.find_all(nodes.Name))
        for target in targets:
            single = isinstance(node.target, nodes.Name) and found is not None
            inner[target.name] = (found[0], (*found[1], EACH)) if single and found is not None else None
        if node.test is not None:
            self.visit(node.test, inner, guarded=False)
        for child in node.body:
            self.visit(child, inner, guarded=False)
        for child in node.else_:
            self.visit(child, env, guarded=False)
