"""The Jinja sandbox prompts render in, bounded in what a render may build and in how long it may take.

A template is code from a spec file, and the immutable sandbox stops it reaching Python internals, not
from making `'a' * 10**9` or looping 10**10 times. Here, during a render (`bounded`):

- no value a template builds (a string, a list, an integer's digits) may be larger than
  VALUE_FACTOR × MP_MAX_PROMPT_CHARS: checked before the value is made wherever its size can be known
  ahead (`*`, `**`, `+`, `~`, `%`, padding, `replace`, `join`, format widths, `lipsum`, ...), and after
  for everything else a filter, a call or an operator returns;
- the values one render builds add up to at most BUILD_FACTOR × MP_MAX_PROMPT_CHARS, so many values just
  under the limit cannot add up to gigabytes either;
- the render stops at its deadline (the task's, and never later than RENDER_SECONDS after it starts),
  checked at every loop iteration, call, `~` and intercepted operator.

`templates.render` stops the output itself as soon as it passes MP_MAX_PROMPT_CHARS.
"""

from __future__ import annotations

import functools
import math
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from markupsafe import EscapeFormatter, Markup

from mp_pipelines.spec.sandbox_sizes import (
    CONTAINERS,
    FILTER_SIZES,
    FILTER_WORK,
    Arguments,
    Measure,
    binop_size,
    call_size,
    size_of,
)
from mp_pipelines.spec.size_limits import MAX_PROMPT_CHARS

VALUE_FACTOR = 10  # one value a template builds: at most this many times the prompt limit
BUILD_FACTOR = 100  # all values one render builds, added up
RENDER_SECONDS = 10.0  # the longest one render may take when the task has no earlier deadline
ITERATE_FILTER = "_bounded_iteration"  # wrapped around every `{% for %}` iterable by bound_loops


class TooBig(ValueError):
    """A template tried to build a value, or values in all, larger than it may."""


class OutOfTime(ValueError):
    """A render went past its deadline."""


@dataclass
class _Render:
    """The bounds of the render in progress and what it has built so far."""

    deadline: float
    seconds: float  # from the render's start to its deadline, for messages
    value_limit: int
    build_limit: int
    built: int = 0
    measure: Measure = field(default_factory=Measure)


_CURRENT: ContextVar[_Render | None] = ContextVar("mp_pipelines_render", default=None)


@contextmanager
def bounded(deadline: float | None, prompt_limit: int) -> Iterator[None]:
    """Bound the renders inside: at most until `deadline` (time.monotonic()), never over RENDER_SECONDS, and
    values as large as `prompt_limit` (MP_MAX_PROMPT_CHARS read once by the caller) allows."""
    now = time.monotonic()
    end = now + RENDER_SECONDS if deadline is None else min(deadline, now + RENDER_SECONDS)
    state = _Render(end, max(end - now, 0.0), VALUE_FACTOR * prompt_limit, BUILD_FACTOR * prompt_limit)
    token = _CURRENT.set(state)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _state() -> _Render:
    # Outside `bounded` (Jinja folding constants while compiling) only the size bounds apply.
    state = _CURRENT.get()
    if state is None:
        limit = MAX_PROMPT_CHARS.value()
        state = _Render(math.inf, math.inf, VALUE_FACTOR * limit, BUILD_FACTOR * limit)
    return state


def check_time() -> None:
    """OutOfTime when the render in progress has passed its deadline."""
    state = _CURRENT.get()
    if state is not None and time.monotonic() > state.deadline:
        raise OutOfTime(f"the template ran longer than the {state.seconds:.2g} s it had "
                        "(loops or macro calls that run too long?)")


def _too_big(size: float, what: str, limit: int) -> TooBig:
    return TooBig(f"{what} would make a value of {int(size):,} characters or items, more than the {limit:,} "
                  f"a template may build ({VALUE_FACTOR} × {MAX_PROMPT_CHARS.env})")


def check_size(size: float, what: str) -> None:
    """TooBig when a value of `size` characters or items is more than a template may build."""
    limit = (_CURRENT.get() or _state()).value_limit
    if size > limit:
        raise _too_big(size, what, limit)


def charge(value: Any, what: str, work: float = 0, given: tuple[Any, ...] = ()) -> Any:
    """Count a value a template built (and `work` it cost) against the render's bounds; return the value.

    A value that is one of the `given` arguments was not built, so it costs nothing.
    """
    for arg in given:
        if value is arg:
            return value
    state = _CURRENT.get() or _state()
    size = size_of(value)
    if size > state.value_limit:
        raise _too_big(size, what, state.value_limit)
    if isinstance(value, CONTAINERS):
        _check_repetition(value, what, state)
    state.built += size + int(work)
    if state.built > state.build_limit:
        raise TooBig(f"the template built values of more than {state.build_limit:,} characters or items in all "
                     f"({BUILD_FACTOR} × {MAX_PROMPT_CHARS.env})")
    return value


def _check_repetition(value: Any, what: str, state: _Render) -> None:
    """TooBig when a container holds its parts so many times over that written out it is too large.

    Holding big inputs once or twice is fine (they were allowed in); holding anything many times over is not.
    """
    expanded = state.measure.expanded(value)
    if expanded > state.value_limit and expanded > 2 * state.measure.distinct(value):
        shown = "endless" if math.isinf(expanded) else f"{int(expanded):,} characters or items"
        raise TooBig(f"{what} would make a value that holds its parts so many times over that written out it is "
                     f"{shown}, more than the {state.value_limit:,} a template may build "
                     f"({VALUE_FACTOR} × {MAX_PROMPT_CHARS.env})")


def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` (a Jinja filter) checking the size it will make (FILTER_SIZES) and what it made.

    No deadline check: without a loop or a call (which check it) a filter's work is bounded by the sizes.
    """
    estimate, work = FILTER_SIZES.get(name), FILTER_WORK.get(name)
    arguments = Arguments(func) if estimate is not None else None
    what = f"the {name} filter"

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja still passes the context first
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if arguments is not None and estimate is not None:
            bound = arguments.bind(args, kwargs)
            check_size(estimate(bound), what)
            if work is not None:
                charge(None, what, work=work(bound))
            args = arguments.unbind(bound, args, kwargs)
        return charge(func(*args, **kwargs), what, given=args)

    return guarded


def bounded_iteration(iterable: Any) -> Any:
    """A `{% for %}` iterable that checks the deadline as it goes."""
    return _TimedIterable(iterable)


class _TimedIterable:
    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable

    def __len__(self) -> int:  # `loop.length` and `loop.last` use it when the iterable has one
        return len(self._iterable)

    def __iter__(self) -> Iterator[Any]:
        # Every 64th item is often enough: a loop body's own loops and calls check the deadline themselves.
        countdown = 0
        for item in self._iterable:
            if not countdown:
                check_time()
                countdown = 64
            countdown -= 1
            yield item


def bound_loops(tree: nodes.Template) -> nodes.Template:
    """The template with every `{% for %}` iterable passed through ITERATE_FILTER (a deadline check per item)."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, ITERATE_FILTER, [], [], None, None, lineno=loop.lineno)
    return tree


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, except that `a ~ b` goes through BoundedEnvironment.concat (macro and block
    output already does) and list, tuple and dict literals through BoundedEnvironment.built."""

    def _built(self, visit: Callable[[Any, Frame], None], node: Any, frame: Frame) -> None:
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._built(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._built(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # `{% for a, b in ... %}` and `{% set a, b = ... %}` assign to a tuple
            super().visit_Tuple(node, frame)
        else:
            self._built(super().visit_Tuple, node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Formatter(SandboxedFormatter):
    """The sandbox's `str.format` formatter, refusing widths and precisions over the value limit."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        check_size(max((int(n) for n in re.findall(r"\d+", format_spec)), default=0), "a format width")
        return super().format_field(value, format_spec)


class _EscapeFormatter(_Formatter, EscapeFormatter):
    pass


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the bounds of this module on operators, `~`, calls, filters and loops."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters[ITERATE_FILTER] = bounded_iteration

    def guard_filters(self) -> None:
        """Wrap every filter registered so far with guard_filter (call after adding the project's filters)."""
        for name, func in list(self.filters.items()):
            if name != ITERATE_FILTER:
                self.filters[name] = guard_filter(name, func)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_time()
        expected = binop_size(operator, left, right)
        if expected is not None:
            check_size(expected, repr(operator))
        return charge(super().call_binop(context, operator, left, right), repr(operator), given=(left, right))

    def built(self, value: Any) -> Any:
        """A list, tuple or dict literal the template made, counted against the bounds."""
        return charge(value, "a list, tuple or dict")

    def concat(self, parts: Iterable[Any]) -> str:
        """Jinja's `"".join` for `a ~ b` and for the output of a macro or `{% set %}` block: the joined text,
        refused before it is made when it would be too long."""
        check_time()
        texts = [str(part) for part in parts]
        what = "joining text (~, a macro or a block)"
        check_size(sum(map(len, texts)), what)
        return charge("".join(texts), what)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        check_time()
        what = f"calling {getattr(__obj, '__name__', type(__obj).__name__)}"
        expected = call_size(__obj, args, kwargs)
        if expected is not None:
            check_size(expected, what)
        return charge(super().call(__context, __obj, *args, **kwargs), what, given=(*args, *kwargs.values()))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` / `str.format_map` through a formatter that refuses huge widths (see _Formatter)."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or not isinstance(value.__self__, str):
            return None  # the common case (every attribute a template reads comes here), decided cheaply
        if value.__name__ not in ("format", "format_map"):
            return None
        text: str = value.__self__
        formatter = _EscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else _Formatter(self)
        is_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument and no keyword arguments")
                args, kwargs = (), args[0]
            return charge(type(text)(formatter.vformat(text, args, kwargs)), "format")

        return functools.update_wrapper(wrapper, value)
