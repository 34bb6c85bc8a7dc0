"""Which files an input may read: regular files whose real path stays inside the folders allowed.

Every file a workflow reads as data (a table, a folder's documents, an inbox file) passes `readable_file`
first, the one place this rule lives. A link is judged by where it leads, so a documents folder holding
`env.txt -> /proc/self/environ` cannot hand the process's environment (and its API keys) to a model.

Before that, every file or folder input must lie inside the allowed input roots (`input_roots`: MP_INPUT_ROOTS,
or the workflow's folder, the shipped sample data, the inbox and a local CLI run's folder), checked by the run's
first step and by the inbox sensor before anything of the path is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Files there describe processes and the kernel, not data; they also report a size of 0, so no byte limit
# measured before reading would stop them.
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"))
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),  # opening one to read waits for a writer, maybe forever
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class InputPathError(ValueError):
    """An input file that may not be read: it leads outside its folder or into /proc or /sys, or is no regular file."""


def readable_file(path: Path | str, *, what: str, inside: Sequence[Path | str] = ()) -> Path:
    """The real path of `path` once it is known to be a regular file that may be read; InputPathError otherwise.

    `what` names the file in the error ("input 'docs': file 'a.txt' of folder '/data'"). With `inside`, the
    real path must lie within one of those folders (taken by their real paths), so no link leads out of them.
    """
    try:
        real = Path(path).resolve(strict=True)
    except FileNotFoundError:
        raise InputPathError(f"{what} does not exist (or is a link to nothing)") from None
    except (OSError, RuntimeError) as exc:  # a link loop, a folder on the way that may not be entered
        raise InputPathError(f"{what} cannot be followed to a file: {exc}") from None
    for system in SYSTEM_FOLDERS:
        if real.is_relative_to(system):
            raise InputPathError(f"{what} leads to {str(real)!r} in {system}, which holds process and kernel state, "
                                 "not data; only regular files are read")
    roots = [Path(root).resolve() for root in inside]
    if roots and not any(real.is_relative_to(root) for root in roots):
        folders = " or ".join(repr(str(root)) for root in roots)
        raise InputPathError(f"{what} leads to {str(real)!r}, outside {folders}; only files whose real path is "
                             f"inside {'it' if len(roots) == 1 else 'one of them'} are read")
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise InputPathError(f"{what} is {kind}, not a regular file; only regular files are read")
    return real


def is_utf8_name(name: str) -> bool:
    """Whether a file name as the OS gave it is valid UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(name: str) -> str:
    """A file name as logs and cursors spell it: bytes that are not UTF-8 become \\xNN escapes."""
    return name if is_utf8_name(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


def quoted_name(name: str) -> str:
    """A file name quoted for an error message, readable even when it is not UTF-8."""
    return repr(name) if is_utf8_name(name) else f"'{shown_name(name)}'"


# --- allowed input roots ------------------------------------------------------------------------------------------

INPUT_ROOTS_ENV = "MP_INPUT_ROOTS"
# Set by `mp-pipelines run`/`resume` in their own process (and so in the step processes they start) to the folder
# they were started in; a webserver, daemon or code server never sets it, so Launchpad, GraphQL, schedule and
# sensor runs never get their process's working folder as a root.
LOCAL_RUN_DIR_ENV = "MP_LOCAL_RUN_DIR"
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "workflows" / "data"


@dataclass(frozen=True)
class InputRoots:
    """The folders file and folder inputs may lie in (by their real paths), and where that list came from."""

    folders: tuple[Path, ...]
    source: str  # how the error explains the list: "MP_INPUT_ROOTS plus the shipped sample data", or the defaults

    def __str__(self) -> str:
        return ", ".join(repr(str(folder)) for folder in self.folders)

    def contains(self, real: Path) -> bool:
        return any(real.is_relative_to(folder) for folder in self.folders)

    def check(self, path: Path | str, *, what: str) -> Path:
        """The real path of `path` once it is known to lie inside a root; InputPathError naming the roots otherwise.

        Nothing is opened or listed: only links are followed. A path outside every root is refused whether or
        not it exists, so the error tells nothing about files outside the roots.
        """
        given = Path(path)
        try:
            real = given.resolve()
        except (OSError, RuntimeError) as exc:  # a link loop
            raise InputPathError(f"{what} cannot be followed: {exc}") from None
        if not self.contains(real):
            leads = "" if real == given else f" (which leads to {str(real)!r})"
            raise InputPathError(
                f"{what}{leads} is outside the allowed input roots {self} ({self.source}); inputs are read only "
                f"from inside them: move the data there or add its folder to {INPUT_ROOTS_ENV}")
        return real

    def resolve(self, value: str, *, what: str, base_dir: Path | None) -> Path:
        """The real path of a table input as given: absolute, or relative to the working folder when that is a root
        and the file is there, else to `base_dir` (the workflow file's folder); refused unless inside a root."""
        path = Path(value).expanduser()
        if not path.is_absolute():
            candidates = [Path.cwd() / path] + ([base_dir / path] if base_dir is not None else [])
            inside = [c for c in candidates if self.contains(_real(c))]
            existing = [c for c in inside if c.exists()]
            path = (existing or inside or candidates)[0]
        return self.check(path, what=what)


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _folders(entries: Sequence[str | Path | None]) -> tuple[Path, ...]:
    folders: list[Path] = []
    for entry in entries:
        if entry is None or not str(entry).strip():
            continue
        folder = _real(Path(entry).expanduser())
        if folder not in folders:
            folders.append(folder)
    return tuple(folders)


def input_roots(*, workflow_dir: Path | str | None = None, inbox: Path | str | None = None) -> InputRoots:
    """The allowed input roots now, from the environment.

    MP_INPUT_ROOTS set: its folders plus the shipped sample data. Unset: the workflow file's folder, the shipped
    sample data, the inbox and, in a local CLI run (MP_LOCAL_RUN_DIR), the folder the command was started in.
    """
    configured = os.environ.get(INPUT_ROOTS_ENV, "")
    if configured.strip():
        return InputRoots(_folders([*configured.split(os.pathsep), SAMPLE_DATA]),
                          f"{INPUT_ROOTS_ENV} plus the shipped sample data")
    local = os.environ.get(LOCAL_RUN_DIR_ENV)
    source = (f"{INPUT_ROOTS_ENV} is unset: the workflow's folder, the shipped sample data, the inbox"
              + (" and the folder of this local CLI run" if local else ""))
    return InputRoots(_folders([workflow_dir, SAMPLE_DATA, inbox, local]), source)
