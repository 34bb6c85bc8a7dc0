"""Which files an input may read: regular files whose real path stays inside the folders allowed.

Every file a workflow reads as data (a table, a folder's documents, an inbox file) passes `readable_file`
first, the one place this rule lives. A link is judged by where it leads, so a documents folder holding
`env.txt -> /proc/self/environ` cannot hand the process's environment (and its API keys) to a model.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
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
