"""Workflow input values: coercion from YAML, JSON and CLI strings, and loading of table inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mp_pipelines.spec.size_limits import MAX_INPUT_CHARS
from mp_pipelines.spec.tables import read_table

TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce_input(kind: str, value: Any, name: str, *, check_size: bool = True) -> Any:
    """Convert `value` to the input type `kind`, raising ValueError that names input `name`.

    A value longer than MP_MAX_INPUT_CHARS is refused first (SizeLimitError), before any parsing. Values
    written in a spec file (defaults, schedule inputs) pass `check_size=False`: the file's own size limit
    bounds them, and lowering the input limit must not make a workflow disappear.
    """
    if check_size:
        check_input_size(value, name)
    coerce = _COERCERS[kind]
    article = "an" if kind[0] in "aeiou" else "a"
    try:
        return coerce(value)
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: a JSON list nested thousands deep
        raise ValueError(f"input {name!r} expects {article} {kind}: {exc}") from None


def check_input_size(value: Any, name: str) -> None:
    """SizeLimitError when a string, or a list or object as JSON, is longer than MP_MAX_INPUT_CHARS characters."""
    if isinstance(value, str):
        MAX_INPUT_CHARS.check(len(value), f"input {name!r}")
    elif isinstance(value, (list, dict)):
        MAX_INPUT_CHARS.check(len(json.dumps(value, ensure_ascii=False, default=str)), f"input {name!r} as JSON")


def _string(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise TypeError(f"got a {type(value).__name__}")
    return str(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("got a boolean")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
    if isinstance(value, (int, float)):
        return int(value)
    raise TypeError(f"got a {type(value).__name__}")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"got a {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not one of true/false/yes/no/1/0")


def _list(value: Any) -> list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list):
        raise TypeError(f"got a {type(value).__name__}; give a list (JSON array or comma-separated)")
    for index, element in enumerate(value):
        if not isinstance(element, (str, dict, int, float, bool)):
            raise TypeError(f"element {index} is a {type(element).__name__}; lists hold strings or objects")
    return value


def _table(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("give the path of a CSV, JSONL or Parquet file")
    suffix = Path(value).suffix.lower()
    if suffix and suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{value!r} is not a .csv, .jsonl or .parquet file, nor a folder of text files")
    return value


_COERCERS = {
    "string": _string,
    "integer": _integer,
    "number": _number,
    "boolean": _boolean,
    "list": _list,
    "table": _table,
}


def load_table(path: str | Path, *, name: str = "table", max_rows: int | None = None):
    """Read a CSV, JSONL or Parquet file (or a folder of text files) into a DataFrame.

    Errors name the input and the file. A folder gives one row per .txt/.md file: `name`, `path`, `text`.
    Limits (MP_MAX_TABLE_BYTES on the decoded size, MP_MAX_TABLE_ROWS and `max_rows`, the workflow's max_items,
    on rows, MP_MAX_CELL_CHARS on a text cell) are checked before reading or while reading in bounded chunks,
    so passing one costs no more than the chunk that passed it (SizeLimitError). Only a regular file, or a
    folder's regular files inside it, is read, never /proc or /sys (InputPathError).
    """
    return read_table(path, name=name, max_rows=max_rows, keep=True)


def check_table(path: str | Path, *, name: str = "table", max_rows: int | None = None) -> int:
    """The row count of the table `load_table` would read, after the same checks, keeping none of its data."""
    return read_table(path, name=name, max_rows=max_rows, keep=False)

