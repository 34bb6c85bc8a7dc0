"""Prompt templates: sandboxed Jinja2 rendering and static analysis of what a template refers to.

Inputs are data: they are passed as values, never re-rendered, so an input holding `{{ ... }}`
stays literal text. Templates may not name `__` attributes (`__class__`, `__globals__`, ...): parsing
refuses them, so a spec that tries is invalid, and the sandbox refuses any other unsafe attribute
when rendering. A rendered prompt longer than MP_MAX_PROMPT_CHARS is an error, never sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mp_pipelines.spec.size_limits import MAX_PROMPT_CHARS


class TemplateError(ValueError):
    """A template could not be parsed or rendered; the message says which variable or line."""


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)


def make_environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja environment every prompt, system message and condition uses."""
    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, trim_blocks=False
    )
    env.filters["tojson"] = _tojson  # the stock filter HTML-escapes, which corrupts prompts
    return env


_ENV = make_environment()


@dataclass(frozen=True)
class TemplateRefs:
    """What a template reads: free top-level names and the attributes used on some of them."""

    names: frozenset[str]
    attributes: dict[str, frozenset[str]] = field(default_factory=dict)  # e.g. {"inputs": {"topic"}}


def parse(source: str) -> nodes.Template:
    """Parse a template, raising TemplateError with the line and reason on bad syntax or a `__` attribute."""
    try:
        tree = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    refuse_internals(tree)
    return tree


def refuse_internals(tree: nodes.Template) -> None:
    """TemplateError when the template reads an attribute starting with `__` (by `.name`, `["name"]` or `|attr`)."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            key = node.attr
        elif isinstance(node, nodes.Getitem):
            key = getattr(node.arg, "value", None)
        else:
            key = node.args[0].value if node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const) else None
        if isinstance(key, str) and key.startswith("__"):
            raise TemplateError(f"line {node.lineno}: {key!r} is a Python internal, which templates may not read; "
                                "read inputs.<name>, task outputs, item and loop by name")


def references(source: str, *, expression: bool = False) -> TemplateRefs:
    """Names (and their constant attributes) a template or expression reads from its context."""
    from jinja2 import meta

    tree = parse(as_template(source) if expression else source)
    names = frozenset(meta.find_undeclared_variables(tree))
    attributes: dict[str, set[str]] = {}
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if isinstance(target, nodes.Name) and target.name in names:
            key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(key, str):
                attributes.setdefault(target.name, set()).add(key)
    return TemplateRefs(names, {k: frozenset(v) for k, v in attributes.items()})


def expression_body(expression: str) -> str:
    """A condition without its optional `{{ }}` braces."""
    text = expression.strip()
    return text[2:-2] if text.startswith("{{") and text.endswith("}}") else text


def as_template(expression: str) -> str:
    """A condition as a one-expression template, for parsing it like any prompt."""
    return "{{ (" + expression_body(expression) + ") }}"


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Any:
    # A fan-out renders one template thousands of times; compiling it once saves ~0.4 ms a call.
    return _ENV.from_string(parse(source))


@lru_cache(maxsize=1024)
def _compiled_expression(text: str) -> Any:
    refuse_internals(_ENV.parse(as_template(text)))
    return _ENV.compile_expression(text, undefined_to_none=False)


def render(source: str, context: dict[str, Any]) -> str:
    """Render a template with `context`; undefined names, sandbox violations and a too-long result raise TemplateError."""
    try:
        text = _compiled(source).render(context)
    except TemplateError:
        raise
    except Exception as exc:  # UndefinedError, SecurityError, errors inside filters
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    try:
        MAX_PROMPT_CHARS.check(len(text), "rendered prompt")
    except ValueError as exc:  # too long, or MP_MAX_PROMPT_CHARS is no number
        raise TemplateError(str(exc)) from None
    return text


def evaluate(expression: str, context: dict[str, Any]) -> bool:
    """Evaluate a condition such as `classify.severity == 'high'` (braces optional) to a bool."""
    try:
        return bool(_compiled_expression(expression_body(expression))(context))
    except TemplateSyntaxError as exc:
        raise TemplateError(f"Jinja syntax error in condition {expression!r}: {exc.message}") from None
    except Exception as exc:
        reason = str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
        raise TemplateError(f"condition {expression!r} failed: {reason}") from None
