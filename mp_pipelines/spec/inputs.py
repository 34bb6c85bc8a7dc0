"""Workflow input values: coercion from YAML, JSON and CLI strings, and loading of table inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mp_pipelines.spec.size_limits import MAX_INPUT_CHARS, MAX_TABLE_BYTES, SizeLimitError

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
        return int(value.strip())
    if isinstance(value, (int, float)):
        return int(value)
    raise TypeError(f"got a {type(value).__name__}")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"got a {type(value).__name__}")
    return float(value)


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
    A file (or a folder's text files together) larger than MP_MAX_TABLE_BYTES is refused before it is read,
    and a table with more than `max_rows` rows (the workflow's max_items) after; both raise SizeLimitError.
    """
    import pandas as pd

    file = Path(path)
    if file.is_dir():
        return _text_folder(file, name=name, max_rows=max_rows)
    if not file.is_file():
        raise FileNotFoundError(f"input {name!r}: table file {str(file)!r} does not exist")
    MAX_TABLE_BYTES.check(file.stat().st_size, f"input {name!r}: table file {str(file)!r}")
    suffix = file.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(file)
        elif suffix in (".jsonl", ".ndjson"):
            frame = pd.read_json(file, lines=True)
        elif suffix == ".json":
            frame = pd.read_json(file)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(file)
        else:
            raise ValueError(f"unsupported table format {suffix!r}; use .csv, .jsonl or .parquet")
    except (ValueError, OSError) as exc:
        raise ValueError(f"input {name!r}: cannot read table {str(file)!r}: {exc}") from None
    except Exception as exc:  # pandas raises parser-specific errors (ParserError, ArrowInvalid)
        raise ValueError(f"input {name!r}: cannot read table {str(file)!r}: {type(exc).__name__}: {exc}") from None
    _check_rows(len(frame), max_rows, f"input {name!r}: table {str(file)!r} has {len(frame):,} rows")
    return frame


def _check_rows(rows: int, max_rows: int | None, what: str) -> None:
    if max_rows is not None and rows > max_rows:
        raise SizeLimitError(f"{what}, more than the limit {max_rows:,} (the workflow's max_items)")


TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


def _text_folder(folder: Path, *, name: str, max_rows: int | None):
    import pandas as pd

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"input {name!r}: folder {str(folder)!r} holds no {', '.join(TEXT_SUFFIXES)} files")
    _check_rows(len(files), max_rows, f"input {name!r}: folder {str(folder)!r} has {len(files):,} files")
    MAX_TABLE_BYTES.check(sum(file.stat().st_size for file in files),
                          f"input {name!r}: the text files of folder {str(folder)!r} together")
    rows = []
    for file in files:
        try:
            rows.append({"name": file.name, "path": str(file), "text": file.read_text(encoding="utf-8")})
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"input {name!r}: cannot read {str(file)!r}: {exc}") from None
    return pd.DataFrame(rows)


def resolve_path(value: str, base_dir: Path | None) -> str:
    """A relative table path: as given when it exists from the working folder, else from `base_dir`."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return str(path)
    candidate = base_dir / path
    return str(candidate) if candidate.exists() else str(path)
