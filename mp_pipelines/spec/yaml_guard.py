"""Guards between untrusted YAML and validation: a safe loader with clear errors, and a shape check.

`UniqueKeyLoader` is PyYAML's SafeLoader (no Python tags, nothing executed) that also refuses repeated
keys and turns every construction failure into a YAML error with a line and column; it reads merge keys
(`<<: *anchor`) as yaml.safe_load does, keeping each key once so merges of merges cannot multiply. `shape_problem`
refuses data that would exhaust whatever walks it next: nesting too deep, a YAML alias that contains
itself, or aliases that expand a small file into millions of values.
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

MAX_DEPTH = 64  # levels of nested mappings and lists; real specs use under ten
MAX_VALUES = 1_000_000  # values in a spec once YAML aliases are expanded
MERGE_TAG = "tag:yaml.org,2002:merge"
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

    def __init__(self, stream: Any, *, collect_repeats: bool = False) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # mappings whose own keys were checked (their nodes live as long as this)
        # With collect_repeats, a repeated key is noted here as (line, column, key), the later value winning as in
        # plain YAML, so that the file's other problems are still found; else it is an error at once.
        self.collect_repeats = collect_repeats
        self.repeats: list[tuple[int, int, Any]] = []

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

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Merge `<<` keys as PyYAML does, then keep each merged key once (the value the mapping would get), so
        a merge of ten mappings that each merge ten more holds ten keys, not a hundred copies of them.

        PyYAML flattens every mapping before constructing it, and an anchored one also when it is first merged
        (which may come first), so the keys written in it are checked here, once, before any merge."""
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_repeated_keys(node)
        super().flatten_mapping(node)
        first: dict[tuple[str, str], int] = {}  # scalar key (tag, text) → its index in `pairs`
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in first:  # a later pair wins, in the place the key first had
                pairs[first[key]] = (pairs[first[key]][0], value_node)
                continue
            if key is not None:
                first[key] = len(pairs)
            pairs.append((key_node, value_node))
        node.value = pairs

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        """ConstructorError for a key written twice in this mapping, or a mapping or list as a key."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # merged keys may be overridden: that is what a merge is for
                continue
            key = self.construct_object(key_node)
            if not isinstance(key, typing.Hashable):
                kind = {dict: "mapping", list: "list"}.get(type(key), type(key).__name__)
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {kind} cannot be a key (an unquoted template such as {{{{ x }}}} reads as a mapping "
                    "inside a mapping); put templates in quotes", key_node.start_mark
                )
            if key in seen and self.collect_repeats:
                mark = key_node.start_mark
                self.repeats.append((mark.line + 1, mark.column + 1, key))
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
