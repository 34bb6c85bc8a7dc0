"""Prompt templates: sandboxed Jinja2 rendering and static analysis of what a template refers to.

Inputs are data: they are passed as values, never re-rendered, so an input holding `{{ ... }}`
stays literal text. Templates may not name `__` attributes (`__class__`, `__globals__`, ...): parsing
refuses them, so a spec that tries is invalid, and the sandbox refuses any other unsafe attribute
when rendering. A render stops as soon as its output passes MP_MAX_PROMPT_CHARS, and `spec/sandbox.py`
bounds what it may build and how long it may take, so a prompt too long is an error, never sent.
`{% include %}` and `{% import %}` read files of the workflow's prompt library (`spec/library.py`), which are
checked and bounded the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, nodes

from mp_pipelines.spec import sandbox
from mp_pipelines.spec.library import Library, LibraryError, Walk, statements, walk
from mp_pipelines.spec.size_limits import MAX_PROMPT_CHARS, SettingError, SizeLimitError


class TemplateError(ValueError):
    """A template could not be parsed or rendered; the message says which variable or line."""


class RenderTimeout(TemplateError):
    """A render went past its deadline (the task's, or the sandbox's own bound on one render)."""


def _tojson(value: Any, indent: int | None = None) -> str:
    # Indentation is repeated on every line, so a wide one would multiply a value's size many times over.
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise ValueError(f"tojson's indent must be a whole number from 0 to 16, not {indent!r}")
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)


def make_environment(loader: BaseLoader | None = None) -> sandbox.BoundedEnvironment:
    """The Jinja environment prompts, system messages and conditions use (with `loader`: one prompt library's)."""
    env = sandbox.BoundedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, trim_blocks=False, loader=loader
    )
    env.filters["tojson"] = _tojson  # the stock filter HTML-escapes, which corrupts prompts
    env.guard_filters()
    return env


_ENV = make_environment()
# Names Jinja itself defines (range, dict, lipsum, ...): a template reading one of them gets Jinja's.
JINJA_GLOBALS = frozenset(_ENV.globals)
# Names a template reads as something else: constants Jinja parses in lower case, `self` (the template
# itself) and the names Jinja binds inside macros (True, False and None are Python keywords, refused anyway).
JINJA_SPECIAL_NAMES = frozenset({"true", "false", "none", "self", "caller", "varargs", "kwargs"})


@dataclass(frozen=True)
class TemplateRefs:
    """What a template reads: free top-level names and the attributes used on some of them."""

    names: frozenset[str]
    attributes: dict[str, frozenset[str]] = field(default_factory=dict)  # e.g. {"inputs": {"topic"}}


NESTED_TOO_DEEPLY = "the template is nested too deeply (brackets, blocks or operators) to read"


def parse(source: str) -> nodes.Template:
    """Parse a template, raising TemplateError with the line and reason on bad syntax or a `__` attribute."""
    try:
        tree = _ENV.parse(source)
        refuse_internals(tree)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    except RecursionError:  # Jinja's parser and node walks recurse once per level of nesting
        raise TemplateError(NESTED_TOO_DEEPLY) from None
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


@lru_cache(maxsize=8192)
def parsed(source: str) -> nodes.Template:
    """A template's tree, parsed once for the static analyses (`references`, `spec/reads.py`), which only read it;
    rendering compiles its own copy."""
    return parse(source)


@lru_cache(maxsize=8192)
def references(source: str, *, expression: bool = False) -> TemplateRefs:
    """Names (and their constant attributes) a template or expression reads from its context.

    Cached: validation, `show` and the job build each ask for every template of a workflow.
    """
    from jinja2 import meta

    tree = parsed(as_template(source) if expression else source)
    try:
        names = frozenset(meta.find_undeclared_variables(tree))
        attributes: dict[str, set[str]] = {}
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            target = node.node
            if isinstance(target, nodes.Name) and target.name in names:
                key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
                if isinstance(key, str):
                    attributes.setdefault(target.name, set()).add(key)
    except RecursionError:
        raise TemplateError(NESTED_TOO_DEEPLY) from None
    return TemplateRefs(names, {k: frozenset(v) for k, v in attributes.items()})


def expression_body(expression: str) -> str:
    """A condition without its optional `{{ }}` braces."""
    text = expression.strip()
    return text[2:-2] if text.startswith("{{") and text.endswith("}}") else text


def as_template(expression: str) -> str:
    """A condition as a one-expression template, for parsing it like any prompt."""
    return "{{ (" + expression_body(expression) + ") }}"


class _LibraryLoader(BaseLoader):
    """Loads `{% include %}`d and `{% import %}`ed files from one prompt library, checked like any prompt.

    Jinja keeps what it loaded and asks `uptodate` before reusing it, so an edited file is read again.
    """

    def __init__(self, library: Library) -> None:
        self.library = library

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
        try:
            file = self.library.read(template)
        except LibraryError as exc:
            if exc.missing:  # what `{% include ... ignore missing %}` lets pass
                raise TemplateNotFound(template, str(exc)) from None
            raise TemplateError(str(exc)) from None
        return file.text, str(file.path), self.library.up_to_date(file)

    def load(self, environment: Any, name: str, globals: Any = None) -> Any:
        text, filename, uptodate = self.get_source(environment, name)
        try:
            tree = parse(text)
        except TemplateError as exc:
            raise TemplateError(f"prompt file {name!r} ({filename}): {exc}") from None
        # Checked again whenever the file is (re)read: it may have changed since the workflow was validated.
        check_library(tree, self.library, start=name)
        code = environment.compile(sandbox.bound_loops(tree), name, filename)
        return environment.template_class.from_code(environment, code, environment.make_globals(globals), uptodate)


def check_library(tree: nodes.Template, library: Library, *, start: str | None = None) -> None:
    """TemplateError with the first problem of what `tree` includes and imports (library.walk), if any."""
    found = walk(tree, library, parse, start=start)
    if found.problems:
        raise TemplateError(found.problems[0])


def library_walk(source: str, library: tuple[str, ...]) -> Walk:
    """What the template `source` includes and imports from `library`, and what is wrong with it: a missing file, a
    path leaving the library, a broken file, an undefined macro, a cycle; each problem naming the file and line."""
    try:
        tree = parsed(source)
    except TemplateError:
        return Walk()  # reported on its own
    return walk(tree, Library(library), parse) if statements(tree) else Walk()


def first_read(source: str, name: str) -> int:
    """The line a template first reads `name` on (1 if it cannot tell)."""
    return next((node.lineno for node in parsed(source).find_all(nodes.Name) if node.name == name and node.ctx == "load"),
                1)


def assigned_names(source: str) -> frozenset[str]:
    """Names a template sets itself (`{% set %}`, loop variables, macros, imports): an included file may read them."""
    tree = parsed(source)
    names = {node.name for node in tree.find_all(nodes.Name) if node.ctx in ("store", "param")}
    names |= {node.name for node in tree.find_all(nodes.Macro)}
    names |= {node.target for node in tree.find_all(nodes.Import)}
    names |= {n if isinstance(n, str) else n[1] for node in tree.find_all(nodes.FromImport) for n in node.names}
    return frozenset(names)


@lru_cache(maxsize=64)
def _environment(folders: tuple[str, ...]) -> sandbox.BoundedEnvironment:
    return make_environment(_LibraryLoader(Library(folders))) if folders else _ENV


@lru_cache(maxsize=1024)
def _compiled(source: str, library: tuple[str, ...] = ()) -> Any:
    # A fan-out renders one template thousands of times; compiling it once saves ~0.4 ms a call. What it includes
    # is loaded when it renders, and read again when the file changed (_LibraryLoader).
    tree = parse(source)
    if statements(tree):
        check_library(tree, Library(library))
    return _environment(library).from_string(sandbox.bound_loops(tree))


@lru_cache(maxsize=1024)
def _compiled_expression(text: str) -> Any:
    refuse_internals(_ENV.parse(as_template(text)))
    return _ENV.compile_expression(text, undefined_to_none=False)


def _render_error(exc: Exception) -> TemplateError:
    """What went wrong while rendering, as a TemplateError (RenderTimeout for a deadline)."""
    if isinstance(exc, sandbox.OutOfTime):
        return RenderTimeout(str(exc))
    if isinstance(exc, (sandbox.TooBig, SizeLimitError)):
        return TemplateError(str(exc))
    if isinstance(exc, TemplateNotFound):
        return TemplateError(str(exc.message))
    if isinstance(exc, RecursionError):
        return TemplateError("the template calls its macros (or includes files) too deeply to render")
    return TemplateError(f"{type(exc).__name__}: {exc}")


def _prompt_limit() -> int:
    return MAX_PROMPT_CHARS.value()  # SettingError, not a TemplateError, when MP_MAX_PROMPT_CHARS is no number


def _produce(source: str, context: dict[str, Any], limit: int, library: tuple[str, ...]) -> str:
    """The rendered text, stopped as soon as it passes `limit` characters (SizeLimitError then)."""
    template = _compiled(source, library)
    size, parts = 0, []
    # What Template.render does, one chunk at a time; its traceback rewriting is not needed here.
    chunks = template.root_render_func(template.new_context(context))
    try:
        for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                MAX_PROMPT_CHARS.check(size, "rendered prompt")
    finally:
        chunks.close()
    return "".join(parts)


def render(source: str, context: dict[str, Any], *, deadline: float | None = None,
           library: tuple[str, ...] = ()) -> str:
    """Render a template with `context`, within `deadline` (a time.monotonic() value) and the sandbox's bounds;
    `{% include %}` and `{% import %}` read from the `library` folders (`spec/library.py`).

    Undefined names, sandbox violations, a value too large to build and a prompt too long raise TemplateError;
    passing the deadline (or the sandbox's longest render) raises RenderTimeout, a TemplateError.
    """
    limit = _prompt_limit()
    try:
        with sandbox.bounded(deadline, limit):
            return _produce(source, context, limit, library)
    except (TemplateError, SettingError):
        raise
    except Exception as exc:  # UndefinedError, SecurityError, errors inside filters, the sandbox's bounds
        raise _render_error(exc) from None


def evaluate(expression: str, context: dict[str, Any], *, deadline: float | None = None) -> bool:
    """Evaluate a condition such as `classify.severity == 'high'` (braces optional) to a bool."""
    return _expression_value(expression, context, deadline, what="condition ", convert=bool)


def value_of(expression: str, context: dict[str, Any], *, deadline: float | None = None) -> Any:
    """The value of an expression such as `plan` or `inputs.items[:3]` (braces optional), as it is: a list stays
    a list. TemplateError when it cannot be evaluated."""
    return _expression_value(expression, context, deadline, what="", convert=lambda value: value)


def _expression_value(expression: str, context: dict[str, Any], deadline: float | None, *, what: str,
                      convert: Callable[[Any], Any]) -> Any:
    """`convert` of `expression`'s value, both in the sandbox, within the deadline and the prompt size limit; its
    errors say `what` it is (a condition) and the expression."""
    limit = _prompt_limit()
    try:
        with sandbox.bounded(deadline, limit):
            return convert(_compiled_expression(expression_body(expression))(context))
    except TemplateSyntaxError as exc:
        raise TemplateError(f"Jinja syntax error in {what}{expression!r}: {exc.message}") from None
    except SettingError:
        raise
    except Exception as exc:
        error = exc if isinstance(exc, TemplateError) else _render_error(exc)
        raise type(error)(f"{what}{expression!r} failed: {error}") from None
