"""How large a value a template operation will make, known before it is made (for spec/sandbox.py).

Each estimate is an upper bound, or close to one, computed from the operands and arguments only, so the
sandbox can refuse `'a' * 10**9` without building it. None means the size cannot be known ahead.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
import types
from collections.abc import Callable, Iterable
from typing import Any

from jinja2.utils import generate_lorem_ipsum

SIZED = (str, bytes, list, tuple, dict, set, frozenset)
CONTAINERS = (list, tuple, dict, set, frozenset)
_END = object()
PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def size_of(value: Any) -> int:
    """Characters or items of a value (digits of an integer); 0 for what holds no data of its own."""
    if isinstance(value, SIZED):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    return 0


def _parts(container: Any) -> Iterable[Any]:
    return itertools.chain.from_iterable(container.items()) if isinstance(container, dict) else container


def _split(container: Any) -> tuple[float, list[Any]]:
    """(size of the container's own items and the text they hold, the containers among its items).

    At C speed where it can be (types first), so a list of a million numbers or strings is measured quickly.
    """
    parts = list(_parts(container)) if isinstance(container, dict) else container
    kinds = set(map(type, parts))
    if not any(issubclass(kind, (*CONTAINERS, str, bytes)) for kind in kinds):
        return float(len(container)), []
    if kinds in ({str}, {bytes}):
        return float(len(container) + sum(map(len, parts))), []
    nested = list(itertools.compress(parts, map(isinstance, parts, itertools.repeat(CONTAINERS))))
    texts = itertools.compress(parts, map(isinstance, parts, itertools.repeat((str, bytes))))
    return float(len(container) + sum(map(len, texts))), nested


class Measure:
    """Sizes of containers written out in full: a list holding one list twice counts it twice.

    A template can make a small structure that is huge written out (`[x, x]`, doubled forty times), and writing
    it out (`tojson`, `string`, comparing it) would run out of memory or time. `expanded` is remembered per
    container, so measuring a value made of measured parts costs only its own items.
    """

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Any, float]] = {}  # id → (the container, kept alive; its expanded size)

    def expanded(self, value: Any) -> float:
        """Items of `value` and characters of its text, written out in full (inf when it contains itself)."""
        if not isinstance(value, CONTAINERS):
            return size_of(value)
        if id(value) in self._memo:
            return self._memo[id(value)][1]
        own, nested = _split(value)
        stack, totals, on_path = [(value, iter(nested))], [own], {id(value)}
        while stack:
            node, parts = stack[-1]
            part = next(parts, _END)
            if part is _END:
                stack.pop()
                on_path.discard(id(node))
                size = totals.pop()
                self._memo[id(node)] = (node, size)
                if not totals:
                    return size
                totals[-1] += size
            elif id(part) in self._memo:
                totals[-1] += self._memo[id(part)][1]
            elif id(part) in on_path:
                return math.inf
            else:
                own, nested = _split(part)
                on_path.add(id(part))
                stack.append((part, iter(nested)))
                totals.append(own)
        return 0.0  # not reached: the loop returns when the outermost container is done

    @staticmethod
    def distinct(value: Any) -> int:
        """Like `expanded`, counting each container and string once however often it is held (a slower walk,
        needed only for a value that is large written out)."""
        seen: set[int] = set()
        total, stack = 0, [value]
        while stack:
            item = stack.pop()
            if isinstance(item, (*CONTAINERS, str, bytes)):
                if id(item) in seen:
                    continue
                seen.add(id(item))
                if isinstance(item, CONTAINERS):
                    stack.extend(_parts(item))
            total += len(item) if isinstance(item, (*CONTAINERS, str, bytes)) else 0
        return total


def printf_size(template: str, args: Any) -> int:
    """An upper bound on the padding `template % args` adds: its widths and precisions (`*` ones from args)."""
    values = args if isinstance(args, tuple) else (args,)
    starred = sum(abs(v) for v in values if isinstance(v, int))
    size = len(template)
    for width, precision in PRINTF.findall(template):
        for part in (width, precision):
            size += starred if part == "*" else int(part or 0)
    return size


def binop_size(operator: str, left: Any, right: Any) -> float | None:
    """Size of the result of `left <operator> right` known before computing it, or None."""
    if operator == "*":
        sequence, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(sequence, SIZED) and isinstance(count, int):
            return len(sequence) * max(count, 0)
        if isinstance(left, int) and isinstance(right, int):
            return size_of(left) + size_of(right)
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        return min(right, 10**15) * math.log10(abs(left)) if abs(left) > 1 else 1
    if operator == "+" and isinstance(left, SIZED) and isinstance(right, SIZED):
        return len(left) + len(right)
    if operator == "%" and isinstance(left, str):
        return printf_size(left, right)
    return None


def _replace_size(text: str, old: str, new: str, count: int | None) -> int:
    found = len(text) + 1 if old == "" else text.count(old)
    if count is not None and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


def _number(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _str_method_size(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """Size of what a `str` (or `bytes`) method such as center or replace returns, known before the call, or None."""
    text, name = method.__self__, method.__name__
    if name in ("center", "ljust", "rjust", "zfill") and args:
        return max(len(text), _number(args[0]))
    if name == "expandtabs":
        return len(text) * max(_number(args[0] if args else kwargs.get("tabsize", 8)), 1)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(text)) and isinstance(args[1], type(text)):
        count = args[2] if len(args) > 2 else kwargs.get("count")
        return _replace_size(text, args[0], args[1], count if isinstance(count, int) else None)
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        # A generator's items are values the template built, each charged already; a list may repeat one.
        return sum(size_of(item) for item in args[0]) + len(text) * max(len(args[0]) - 1, 0)
    if name == "translate" and args and isinstance(args[0], dict):
        longest = max((size_of(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        return len(text) * max(longest, 1)
    return None


def call_size(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """Size of what calling `obj` returns, known before the call, or None."""
    owner = getattr(obj, "__self__", None)
    if isinstance(obj, (types.MethodType, types.BuiltinMethodType)) and isinstance(owner, (str, bytes)):
        return _str_method_size(obj, args, kwargs)
    if obj is generate_lorem_ipsum:
        bound = inspect.signature(generate_lorem_ipsum).bind(*args, **kwargs)
        bound.apply_defaults()
        return _number(bound.arguments["n"]) * _number(bound.arguments["max"]) * 12  # words are under 12 chars
    return None


def _materialise(arguments: dict[str, Any], key: str) -> list[Any]:
    """The iterable argument `key` as a list (so its size can be known), put back for the filter to use."""
    arguments[key] = items = list(arguments[key])
    return items


def _text(arguments: dict[str, Any], key: str) -> str:
    value = arguments.get(key)
    return value if isinstance(value, str) else str(value) if value is not None else ""


def _join_size(a: dict[str, Any]) -> float:
    items = _materialise(a, "value")
    return sum(len(str(item)) for item in items) + len(_text(a, "d")) * max(len(items) - 1, 0)


def _indent_size(a: dict[str, Any]) -> float:
    width = a["width"]
    pad = len(width) if isinstance(width, str) else _number(width)
    text = _text(a, "s")
    return len(text) + (text.count("\n") + 1) * pad


def _wordwrap_size(a: dict[str, Any]) -> float:
    text = _text(a, "s")
    lines = len(text) // max(_number(a["width"]), 1) + text.count("\n") + 1
    return len(text) + lines * len(_text(a, "wrapstring") or "\n")


def _sum_size(a: dict[str, Any]) -> float:
    if not isinstance(a["start"], SIZED):
        return 0
    items = _materialise(a, "iterable")
    return len(a["start"]) + sum(size_of(item) for item in items)


def _sum_work(a: dict[str, Any]) -> float:
    # Summing sequences copies what was summed so far at every step (the iterable is a list by now).
    if not isinstance(a["start"], SIZED) or not isinstance(a["iterable"], list):
        return 0
    return len(a["iterable"]) * _sum_size(a) / 2


# Filters that can make a value much larger than their input: how large, from their bound arguments.
FILTER_SIZES: dict[str, Callable[[dict[str, Any]], float]] = {
    "center": lambda a: max(len(_text(a, "value")), _number(a["width"])),
    "indent": _indent_size,
    "replace": lambda a: _replace_size(_text(a, "s"), _text(a, "old"), _text(a, "new"), a["count"]),
    "join": _join_size,
    "format": lambda a: printf_size(_text(a, "value"), a["args"] or tuple(a["kwargs"].values())),
    "wordwrap": _wordwrap_size,
    "batch": lambda a: _number(a["linecount"]) if a["fill_with"] is not None else 0,
    "slice": lambda a: _number(a["slices"]),
    "sum": _sum_size,
}
# Filters whose work grows faster than what they make: the values they copy on the way, in all.
FILTER_WORK: dict[str, Callable[[dict[str, Any]], float]] = {"sum": _sum_work}


class Arguments:
    """Binds a filter's arguments to its parameter names and back: inspect.signature's bind, at a tenth the cost."""

    def __init__(self, func: Callable[..., Any]) -> None:
        parameters = inspect.signature(func).parameters.values()
        self.names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        self.var_args = next((p.name for p in parameters if p.kind is p.VAR_POSITIONAL), None)
        self.var_kwargs = next((p.name for p in parameters if p.kind is p.VAR_KEYWORD), None)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = {**self.defaults, **dict(zip(self.names, args)), **kwargs}
        if self.var_args:
            bound[self.var_args] = args[len(self.names):]
        if self.var_kwargs:
            bound[self.var_kwargs] = {k: v for k, v in kwargs.items() if k not in self.names}
        return bound

    def unbind(self, bound: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The positional arguments again, with any value the estimate replaced (kwargs are updated in place)."""
        given = self.names[:len(args)]
        for key in kwargs:
            kwargs[key] = bound.get(key, kwargs[key])
        return (*(bound[name] for name in given), *args[len(given):])
