"""The prompt library: Jinja files that prompts and system messages `{% include %}` and `{% import %}`.

A workflow's library is the `prompts/` folder next to its file, then every folder of MP_PROMPTS_PATH
(os.pathsep-separated), then the shipped library (`mp_pipelines/workflows/prompts`, the house style the shipped
workflows use, so a copy of one of them runs from any folder), searched in that order. A name is a relative
path inside one of those folders: no `..`, no absolute path, and a file whose real path (symlinks followed)
leaves its folder is refused. A file is read only up to MP_MAX_PROMPT_FILE_BYTES, and includes nest at most
MAX_INCLUDE_DEPTH deep, without cycles. Names must be quoted strings, so what a template includes is known before it renders:
`walk` follows every include of a template and says what is wrong, with the file and line.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, nodes

from mp_pipelines.spec.size_limits import SettingError, SizeLimit, SizeLimitError

PROMPTS_PATH_ENV = "MP_PROMPTS_PATH"
PROMPTS_FOLDER = "prompts"  # next to the workflow file
SHIPPED_LIBRARY = Path(__file__).resolve().parent.parent / "workflows" / PROMPTS_FOLDER  # searched last
MAX_INCLUDE_DEPTH = 10  # a template including a file including a file ... at most this deep
MAX_PROMPT_FILE_BYTES = SizeLimit("MP_MAX_PROMPT_FILE_BYTES", 1_000_000, "bytes")  # one library file


class LibraryError(ValueError):
    """A library file cannot be used: not found, outside the library, too large, unreadable."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # no folder has the file (`ignore missing` allows that)


def library_folders(source: str | None) -> tuple[str, ...]:
    """The prompt library of a workflow file `source` (None or a label: no folder of its own), as absolute paths."""
    folders: list[Path] = []
    if source and Path(source).suffix in (".yaml", ".yml"):
        folders.append(Path(source).resolve().parent / PROMPTS_FOLDER)
    folders += [Path(entry).resolve() for entry in os.environ.get(PROMPTS_PATH_ENV, "").split(os.pathsep)
                if entry.strip()]
    folders.append(SHIPPED_LIBRARY)
    return tuple(dict.fromkeys(str(folder) for folder in folders))


@dataclass(frozen=True)
class LibraryFile:
    """One file of the library as read: its name in templates, where it is, its text and its stamp."""

    name: str
    path: Path
    text: str
    stamp: tuple[int, int]  # (mtime_ns, size): a different stamp means the file changed


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@dataclass(frozen=True)
class Library:
    """The folders a template's includes are looked up in, first match wins."""

    folders: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(self.folders) if self.folders else (
            f"none: add a {PROMPTS_FOLDER}/ folder next to the workflow file or set {PROMPTS_PATH_ENV}")

    def find(self, name: str) -> Path:
        """The file `name` stands for; LibraryError when the name is not allowed or no folder has it."""
        if not name or "\\" in name or name.startswith("/") or PurePosixPath(name).is_absolute() or ":" in name:
            raise LibraryError(f"{name!r} is not a relative file name; name a file inside the prompt library "
                               f"(e.g. 'style.j2')")
        parts = PurePosixPath(name).parts
        if ".." in parts:
            raise LibraryError(f"{name!r} leads out of the prompt library ('..' is not allowed)")
        for folder in map(Path, self.folders):
            candidate = folder.joinpath(*parts)
            if not candidate.is_file():
                continue
            real, root = candidate.resolve(), folder.resolve()
            if not real.is_relative_to(root):
                raise LibraryError(f"{name!r} in {folder} is a link to {real}, outside the prompt library")
            return candidate
        raise LibraryError(f"no file {name!r} in the prompt library (folders: {self.describe()})", missing=True)

    def read(self, name: str) -> LibraryFile:
        """The file `name` with its text; LibraryError when it cannot be used."""
        path = self.find(name)
        stamp = _stamp(path)
        try:
            MAX_PROMPT_FILE_BYTES.check(stamp[1] if stamp else 0, f"prompt file {name!r} ({path})")
            with path.open("rb") as handle:  # read no more than the limit, even if the file grew meanwhile
                data = handle.read(MAX_PROMPT_FILE_BYTES.value() + 1)
            MAX_PROMPT_FILE_BYTES.check(len(data), f"prompt file {name!r} ({path})")
            text = data.decode("utf-8")
        except SettingError:  # MP_MAX_PROMPT_FILE_BYTES is no number: the setting is wrong, not the file
            raise
        except (SizeLimitError, ValueError) as exc:
            if isinstance(exc, UnicodeDecodeError):
                raise LibraryError(f"prompt file {name!r} ({path}) is not UTF-8 text") from None
            raise LibraryError(str(exc)) from None
        except OSError as exc:
            raise LibraryError(f"prompt file {name!r} ({path}) cannot be read ({exc})") from None
        return LibraryFile(name, path, text, stamp or (0, len(data)))

    def up_to_date(self, file: LibraryFile) -> Callable[[], bool]:
        """A check that `file` is still what the name stands for, unchanged (for Jinja's template cache)."""
        def check() -> bool:
            try:
                return self.find(file.name) == file.path and _stamp(file.path) == file.stamp
            except LibraryError:
                return False
        return check


@dataclass(frozen=True)
class Statement:
    """One `{% include %}`, `{% import %}`, `{% from ... import %}` or `{% extends %}` of a template."""

    kind: str
    name: str | None  # None when the file name is not a quoted string
    line: int
    imported: tuple[str, ...] = ()  # `from` imports: the names taken from the file
    alias: str | None = None  # `import ... as alias`
    ignore_missing: bool = False
    with_context: bool = False  # the file sees the including template's names (include; import `with context`)


_KINDS = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from", nodes.Extends: "extends"}


def statements(tree: nodes.Template) -> list[Statement]:
    """What a template includes and imports, in order."""
    found = []
    for node in tree.find_all(tuple(_KINDS)):
        target = node.template
        name = target.value if isinstance(target, nodes.Const) and isinstance(target.value, str) else None
        imported = tuple(n if isinstance(n, str) else n[0] for n in getattr(node, "names", ()))
        found.append(Statement(_KINDS[type(node)], name, node.lineno, imported, getattr(node, "target", None),
                               bool(getattr(node, "ignore_missing", False)),
                               bool(getattr(node, "with_context", isinstance(node, nodes.Extends)))))
    return found


def exported_names(tree: nodes.Template) -> set[str]:
    """Names a file gives `{% from %}` and `{% import %}`: its top-level macros and `{% set %}` variables."""
    names: set[str] = set()

    def visit(body: list[nodes.Node]) -> None:
        for node in body:
            if isinstance(node, nodes.Macro):
                names.add(node.name)
            elif isinstance(node, (nodes.Assign, nodes.AssignBlock)):
                target = node.target
                names.update(n.name for n in ([target] if isinstance(target, nodes.Name) else target.find_all(nodes.Name)))
            elif isinstance(node, nodes.If):
                visit(node.body)
                for branch in node.elif_:
                    visit(branch.body)
                visit(node.else_)
    visit(tree.body)
    return {name for name in names if not name.startswith("_")}


def _alias_reads(tree: nodes.Template, alias: str) -> Iterator[tuple[str, int]]:
    for node in tree.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name) and node.node.name == alias:
            yield node.attr, node.lineno


@dataclass
class Walk:
    """What `walk` found: the library files a template uses (each once), and what is wrong, as messages."""

    files: list[LibraryFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    shared: list[LibraryFile] = field(default_factory=list)  # files that see the template's names (by include)


Parse = Callable[[str], nodes.Template]  # raises ValueError saying the line and reason


def walk(tree: nodes.Template, library: Library, parse: Parse, *, start: str | None = None) -> Walk:
    """Follow every include and import of `tree` through the library, depth first.

    `start` names the library file `tree` is (for messages and cycles); None for a prompt of the workflow.
    Every problem names the file and line of the statement, and for a broken file its own line.
    """
    result = Walk()
    parsed: dict[str, nodes.Template | None] = {}

    def where(name: str | None, line: int) -> str:
        return f"line {line}" if name is None else f"prompt file {name!r}, line {line}"

    def load(name: str) -> nodes.Template | None:
        if name not in parsed:
            file = library.read(name)  # LibraryError: the caller reports it with the statement's line
            parsed[name] = None
            result.files.append(file)
            try:
                parsed[name] = parse(file.text)
            except ValueError as exc:
                result.problems.append(f"prompt file {name!r} ({file.path}): {exc}")
        return parsed[name]

    def visit(current: nodes.Template, name: str | None, chain: tuple[str, ...], shared: bool) -> None:
        for statement in statements(current):
            here = where(name, statement.line)
            if statement.name is None:
                result.problems.append(f"{here}: {statement.kind} needs the file name as a quoted string, "
                                       "so that the file is known before the prompt renders")
                continue
            if statement.name in chain:
                cycle = " → ".join((*chain, statement.name))
                result.problems.append(f"{here}: {statement.kind} {statement.name!r} makes a cycle ({cycle})")
                continue
            if len(chain) >= MAX_INCLUDE_DEPTH:
                result.problems.append(f"{here}: {statement.kind} {statement.name!r} nests library files more than "
                                       f"{MAX_INCLUDE_DEPTH} deep ({' → '.join((*chain, statement.name))})")
                continue
            try:
                seen = statement.name in parsed
                included = load(statement.name)
            except LibraryError as exc:
                if not (statement.ignore_missing and exc.missing):
                    result.problems.append(f"{here}: {statement.kind} {statement.name!r}: {exc}")
                continue
            if included is None:
                continue  # its own problem is reported
            exports = exported_names(included)
            wanted = [(macro, statement.line) for macro in statement.imported]
            if statement.alias:
                wanted += list(_alias_reads(current, statement.alias))
            for macro, line in wanted:
                if macro not in exports:
                    known = ", ".join(sorted(exports)) or "nothing"
                    result.problems.append(f"{where(name, line)}: prompt file {statement.name!r} defines no macro "
                                           f"or variable {macro!r} (it defines {known})")
            if not seen:  # a file met before was followed then
                if shared and statement.with_context:
                    result.shared.append(next(f for f in result.files if f.name == statement.name))
                visit(included, statement.name, (*chain, statement.name), shared and statement.with_context)

    visit(tree, start, (start,) if start else (), True)
    return result


_PLAIN = Environment()  # parses only: what a file includes does not depend on the sandbox


@functools.lru_cache(maxsize=512)
def _plain_parse(text: str) -> nodes.Template:
    """The tree of a template or library file (read, never changed, by `walk`), parsed once per text: a job's
    code versions read the same library files for every task."""
    try:
        return _PLAIN.parse(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"Jinja syntax error on line {exc.lineno}: {exc.message}") from None


def library_sources(spec: Any, source_text: str) -> list[tuple[str, str]]:
    """(name, text) of every library file the template `source_text` of `spec` includes or imports, transitively,
    in the order first met; for code versions, so that editing an included file changes the version.

    Files that cannot be read are left out (validation reports them)."""
    try:
        tree = _plain_parse(source_text)
    except ValueError:
        return []
    if not statements(tree):
        return []
    return [(file.name, file.text) for file in walk(tree, Library(spec.prompt_library), _plain_parse).files]
