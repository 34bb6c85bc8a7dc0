"""Guards between untrusted YAML and validation: a safe loader with clear errors, and a shape check.

`UniqueKeyLoader` is PyYAML's SafeLoader (no Python tags, nothing executed) that also refuses repeated
keys and turns every construction failure into a YAML error with a line and column. `shape_problem`
refuses data that would exhaust whatever walks it next: nesting too deep, a YAML alias that contains
itself, or aliases that expand a small file into millions of values.
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

MAX_DEPTH = 64  # levels of nested mappings and lists; real specs use under ten
MAX_VALUES = 1_000_000  # values in a spec once YAML aliases are expanded
_END = object()  # what next() gives for an exhausted container in shape_problem


def shape_problem(data: Any) -> str | None:
    """Why `data` is unsafe to validate: nested deeper than MAX_DEPTH, containing itself, or (through YAML
    aliases) more than MAX_VALUES values; None when it is fine. Walks with its own stack, not recursion."""
    count = 0
    stack: list[tuple[int | None, typing.Iterator[Any]]] = [(None, iter([data]))]
    open_ids: set[int | None] = set()  # the containers on the path from the top to the current value
    while stack:
        value = next(stack[-1][1], _END)
        if value is _END:
            closed, _ = stack.pop()
            open_ids.discard(closed)
            continue
        count += 1
        if count > MAX_VALUES:
            return f"the data holds more than {MAX_VALUES:,} values once YAML aliases (*name) are expanded"
        if not isinstance(value, (dict, list)):
            continue
        if id(value) in open_ids:
            return "a YAML alias (*name) refers to a mapping or list that contains it, so the data never ends"
        if len(stack) > MAX_DEPTH:
            return f"mappings and lists are nested more than {MAX_DEPTH} levels deep"
        open_ids.add(id(value))
        stack.append((id(value), iter(value.values() if isinstance(value, dict) else value)))
    return None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key repeated in one mapping is an error instead of a silent overwrite,
    and a mapping or list as a key (what an unquoted `{{ template }}` is) gets a hint."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # PyYAML's scalar constructors raise ValueError, KeyError, ... (`!!int abc`)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value {str(node.value)[:40]!r} ({exc})",
                node.start_mark,
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # e.g. `!!set` on a scalar: the base class says why
            return super().construct_mapping(node, deep=deep)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                kind = {dict: "mapping", list: "list"}.get(type(key), type(key).__name__)
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {kind} cannot be a key (an unquoted template such as {{{{ x }}}} reads as a mapping "
                    "inside a mapping); put templates in quotes", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
