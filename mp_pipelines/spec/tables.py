"""Table inputs read within their limits: checked before reading where the file's metadata allows, else while
reading in bounded chunks that stop as soon as a limit is passed.

The limits (size_limits.py): MP_MAX_TABLE_BYTES on the decoded size, what the table takes in memory (and first
on the file itself); MP_MAX_TABLE_ROWS and the workflow's max_items on rows; MP_MAX_CELL_CHARS on one text cell.
A Parquet file is checked from its metadata first: its row count, its column chunks' uncompressed sizes and the
longest value its statistics record, and its schema: nested columns (lists, structs, maps) are refused, and a
fixed-size binary column's decoded size (width × rows) is checked, both before any data is read. Its text
columns are then read as dictionaries, so a value repeated in every row (a few KB compressed, gigabytes decoded)
is measured from the dictionary, never decoded row by row. CSV and JSONL chunks are measured as pandas holds
them; a nested JSON value (a list or an object) counts all levels down, and as long as it prints for its cell.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_pipelines.spec.paths import InputPathError, is_utf8_name, quoted_name, readable_file
from mp_pipelines.spec.size_limits import MAX_CELL_CHARS, MAX_TABLE_BYTES, MAX_TABLE_ROWS, SettingError, SizeLimitError

CHUNK_ROWS = 10_000  # rows decoded at a time while a table is checked
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
_OFFSET_BYTES = 4  # what Arrow stores per text value besides its bytes


class UnsupportedColumnError(ValueError):
    """A table's column has a type table inputs do not take (a nested one); the message names file, column, type."""


@dataclass
class _Reading:
    """One table being read: what errors call it, its row limit from the workflow and what was counted so far."""

    what: str  # "input 'tickets': table '/data/t.csv'"
    max_rows: int | None  # the workflow's max_items
    rows: int = 0
    bytes: int = 0

    def row_limit(self) -> int:
        return min(MAX_TABLE_ROWS.value(), self.max_rows if self.max_rows is not None else MAX_TABLE_ROWS.value())

    def check_rows(self, rows: int, *, at_least: bool = False) -> None:
        """SizeLimitError naming the tighter of max_items and MP_MAX_TABLE_ROWS when `rows` passes it."""
        if self.max_rows is not None and self.max_rows <= MAX_TABLE_ROWS.value() and rows > self.max_rows:
            raise SizeLimitError(f"{self.what} has {'at least ' if at_least else ''}{rows:,} rows, more than the "
                                 f"limit {self.max_rows:,} (the workflow's max_items)")
        MAX_TABLE_ROWS.check(rows, self.what, verb="has", at_least=at_least)

    def add_bytes(self, size: int) -> None:
        """Count `size` more decoded bytes; SizeLimitError as soon as the total passes MP_MAX_TABLE_BYTES."""
        self.bytes += size
        MAX_TABLE_BYTES.check(self.bytes, f"{self.what} once decoded", at_least=True)

    def check_cell(self, chars: int, column: Any, row: int | None) -> None:
        where = f" (row {row})" if row is not None else ""
        MAX_CELL_CHARS.check(chars, f"{self.what}: a cell of column {str(column)!r}{where}")


def read_table(path: str | Path, *, name: str, max_rows: int | None, keep: bool) -> Any:
    """The table at `path` as a DataFrame (`keep`), or only checked and its row count (not `keep`).

    Errors name the input and the file; a limit passed is a SizeLimitError, a file that may not be read an
    InputPathError, anything unreadable a ValueError.
    """
    file = Path(path)
    if file.is_dir():
        frame = _text_folder(file, name=name, max_rows=max_rows)
        return frame if keep else len(frame)
    if not file.exists():
        raise FileNotFoundError(f"input {name!r}: table file {str(file)!r} does not exist")
    real = readable_file(file, what=f"input {name!r}: table file {str(file)!r}")
    MAX_TABLE_BYTES.check(real.stat().st_size, f"input {name!r}: table file {str(file)!r}")
    reading = _Reading(f"input {name!r}: table {str(file)!r}", max_rows)
    try:
        return _read_format(real, file.suffix.lower(), reading, keep)
    except (SizeLimitError, InputPathError, UnsupportedColumnError, SettingError):
        raise
    except (ValueError, OSError) as exc:
        raise ValueError(f"input {name!r}: cannot read table {str(file)!r}: {exc}") from None
    except Exception as exc:  # parsers raise their own errors (ParserError, ArrowInvalid)
        raise ValueError(f"input {name!r}: cannot read table {str(file)!r}: {type(exc).__name__}: {exc}") from None
    finally:
        _release_memory()


def _release_memory() -> None:
    """Hand Arrow's freed memory back to the OS: a long-lived process (the inbox sensor's code server) would
    otherwise keep what checking a table took until its next allocation."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _read_format(real: Path, suffix: str, reading: _Reading, keep: bool) -> Any:
    import pandas as pd

    if suffix in (".parquet", ".pq"):
        rows = _check_parquet(real, reading)
        return pd.read_parquet(real) if keep else rows  # checked: decoding it all now stays within the limits
    if suffix == ".csv":
        with pd.read_csv(real, chunksize=CHUNK_ROWS) as reader:
            chunks = _read_chunks(lambda n: _next_csv_chunk(reader, n), reading, keep)
    elif suffix in (".jsonl", ".ndjson"):
        with real.open(encoding="utf-8") as handle:
            chunks = _read_chunks(_JsonLines(handle).take, reading, keep)
    elif suffix == ".json":  # one JSON document cannot be read in parts; the file's size bounds it
        chunks = _read_chunks(_once(pd.read_json(real)), reading, keep)
    else:
        raise ValueError(f"unsupported table format {suffix!r}; use .csv, .jsonl or .parquet")
    if not keep:
        return reading.rows
    return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame()


# --- CSV, JSONL, JSON: chunks of rows decoded by pandas ---------------------------------------------------------


def _read_chunks(take: Callable[[int], Any], reading: _Reading, keep: bool) -> list[Any]:
    """Read chunks with `take(n)` (None at the end), checking each; the chunks when `keep`, else none."""
    kept = []
    while True:
        # never more rows than one past the limit, so a huge file is not parsed further than needed
        want = min(CHUNK_ROWS, reading.row_limit() + 1 - reading.rows)
        chunk = take(want)
        if chunk is None:
            return kept
        start, reading.rows = reading.rows, reading.rows + len(chunk)
        if reading.rows > reading.row_limit():
            reading.check_rows(reading.rows, at_least=_more(take))
        nested = _check_frame_cells(chunk, reading, start)
        reading.add_bytes(int(chunk.memory_usage(deep=True, index=False).sum()) + nested)
        if keep:
            kept.append(chunk)
        if len(chunk) < want:
            return kept


def _more(take: Callable[[int], Any]) -> bool:
    """Whether anything follows; a row that cannot be parsed counts too (the row count is then a lower bound)."""
    try:
        return take(1) is not None
    except ValueError:
        return True


def _next_csv_chunk(reader: Any, rows: int) -> Any:
    try:
        return reader.get_chunk(rows)
    except StopIteration:
        return None


def _once(frame: Any) -> Callable[[int], Any]:
    """`take` for a table already read whole: all of it, then the end."""
    frames = [frame]
    return lambda rows: frames.pop() if frames else None


class _JsonLines:
    """A JSONL file read `n` records at a time, each chunk parsed as pandas parses `read_json(lines=True)`."""

    def __init__(self, handle: io.TextIOBase) -> None:
        self.handle = handle

    def take(self, rows: int) -> Any:
        import pandas as pd

        lines = []
        for line in self.handle:
            if line.strip():  # pandas skips blank lines too
                lines.append(line if line.endswith("\n") else line + "\n")
                if len(lines) == rows:
                    break
        return pd.read_json(io.StringIO("".join(lines)), lines=True) if lines else None


def _check_frame_cells(frame: Any, reading: _Reading, start: int) -> int:
    """SizeLimitError naming the column and row of a text cell longer than MP_MAX_CELL_CHARS; the bytes the
    nested values (JSON lists and objects) hold beyond what pandas counts (it counts their containers only)."""
    import numpy as np
    import pandas as pd

    nested = 0
    for column in frame.columns:
        series = frame[column]
        if series.dtype == object:
            lengths = np.fromiter((_chars(value) for value in series), dtype=np.int64, count=len(series))
            nested += sum(_contents_bytes(value) for value in series if isinstance(value, (list, dict)))
        elif isinstance(series.dtype, pd.StringDtype):
            lengths = series.str.len().fillna(0).to_numpy(dtype=np.int64)
        else:
            continue
        if len(lengths) and lengths.max() > MAX_CELL_CHARS.value():
            position = int(lengths.argmax())
            reading.check_cell(int(lengths[position]), column, start + position)
    return nested


def _contents_bytes(value: list | dict) -> int:
    """What a nested JSON value's contents take in memory, all levels down (without the outer container)."""
    import sys

    total, pending = 0, [value]
    while pending:  # a loop, not recursion: JSON may nest deeper than Python's recursion limit
        items = pending.pop()
        for item in (list(items.keys()) + list(items.values())) if isinstance(items, dict) else items:
            total += sys.getsizeof(item)
            if isinstance(item, (list, dict)):
                pending.append(item)
    return total


def _chars(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, dict)):  # a nested JSON value: as long as it prints
        return len(str(value))
    return 0


# --- Parquet: metadata first, then batches with text columns as dictionaries -----------------------------------


def _check_parquet(real: Path, reading: _Reading) -> int:
    """Check a Parquet file against every limit without decoding more than one batch; its row count."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(real).metadata
    reading.check_rows(metadata.num_rows)
    schema = metadata.schema.to_arrow_schema()
    _check_parquet_schema(schema, metadata.num_rows, reading)
    _check_parquet_metadata(metadata, reading)
    text = [field.name for field in schema if _is_text(field.type)]
    parquet = pq.ParquetFile(real, metadata=metadata, read_dictionary=text)
    start = 0
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
        for column_name, column in zip(batch.schema.names, batch.columns):
            size, lengths = _arrow_sizes(column)
            if lengths is not None:
                _check_arrow_cells(lengths, column_name, start, reading)
            reading.add_bytes(size)
        start += batch.num_rows
    return start


def _check_parquet_schema(schema: Any, rows: int, reading: _Reading) -> None:
    """Refuse nested columns, and check fixed-size binary columns' widths, from the schema alone.

    A nested column is refused because what it holds is not bounded by the row count: one row of a list column
    may hold millions of values, stored in a few bytes (run-length encoded) and decoded whole, in one batch, and
    its text is not read as dictionaries. A fixed-size binary column is stored as a dictionary but decoded in
    full (its width in every row), so width × rows is its decoded size, and its width is the length of each cell.
    """
    import pyarrow as pa

    fixed = 0
    for field in schema:
        if pa.types.is_nested(field.type):
            raise UnsupportedColumnError(
                f"{reading.what}: column {field.name!r} has the nested type {_type_name(field.type)}; table inputs take flat "
                "columns only (text, numbers, booleans, dates and times): store a nested value as JSON text in a "
                "string column")
        if pa.types.is_fixed_size_binary(field.type):
            reading.check_cell(field.type.byte_width, field.name, None)
            fixed += field.type.byte_width * rows
    MAX_TABLE_BYTES.check(fixed, f"{reading.what} once decoded", at_least=True)


def _type_name(kind: Any) -> str:
    """An Arrow type as its schema prints it; a map without the field name Arrow adds (`map<string, string>`)."""
    import pyarrow as pa

    if pa.types.is_map(kind):
        return f"map<{_type_name(kind.key_type)}, {_type_name(kind.item_type)}>"
    return str(kind)


def _check_parquet_metadata(metadata: Any, reading: _Reading) -> None:
    """Uncompressed size and the longest values the statistics record, from the file's footer alone."""
    uncompressed = 0
    for group_index in range(metadata.num_row_groups):
        group = metadata.row_group(group_index)
        for column_index in range(group.num_columns):
            chunk = group.column(column_index)
            uncompressed += chunk.total_uncompressed_size
            stats = chunk.statistics
            if stats is not None and stats.has_min_max:
                longest = max(_chars(stats.min), _chars(stats.max))
                if longest > MAX_CELL_CHARS.value():
                    reading.check_cell(longest, chunk.path_in_schema, None)
    MAX_TABLE_BYTES.check(uncompressed, reading.what, verb="holds", detail="before compression")


def _is_text(kind: Any) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind))


def _arrow_sizes(column: Any) -> tuple[int, Any]:
    """A column's size once decoded, and its text cells' lengths in characters (None when it holds no text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type) and _is_text(column.type.value_type):
        values, indices = column.dictionary, column.indices
    elif _is_text(column.type):
        values, indices = column, None
    else:
        return column.nbytes, None
    byte_lengths = pc.binary_length(values)
    is_string = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    lengths = pc.utf8_length(values) if is_string else byte_lengths
    if indices is not None:  # each row's value from the dictionary, without decoding the values themselves
        byte_lengths, lengths = pc.take(byte_lengths, indices), pc.take(lengths, indices)
    return (pc.sum(byte_lengths).as_py() or 0) + _OFFSET_BYTES * len(column), lengths


def _check_arrow_cells(lengths: Any, column: str, start: int, reading: _Reading) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    longest = pc.max(lengths).as_py() or 0
    if longest > MAX_CELL_CHARS.value():
        position = pc.index(lengths, pa.scalar(longest, lengths.type)).as_py()
        reading.check_cell(longest, column, start + position)


# --- a folder of text files -------------------------------------------------------------------------------------


def _text_folder(folder: Path, *, name: str, max_rows: int | None) -> Any:
    """One row per text file of `folder` (name, path, text); every file must be a regular file inside it."""
    import pandas as pd

    entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in TEXT_SUFFIXES and not p.is_dir())
    if not entries:
        raise ValueError(f"input {name!r}: folder {str(folder)!r} holds no {', '.join(TEXT_SUFFIXES)} files")
    _Reading(f"input {name!r}: folder {str(folder)!r} (one row per text file)", max_rows).check_rows(len(entries))
    files = [_folder_file(entry, folder, name) for entry in entries]
    MAX_TABLE_BYTES.check(sum(real.stat().st_size for _, real in files),
                          f"input {name!r}: the text files of folder {str(folder)!r} together")
    rows = []
    for entry, real in files:
        try:
            text = real.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"input {name!r}: cannot read {str(entry)!r}: {exc}") from None
        MAX_CELL_CHARS.check(len(text), f"input {name!r}: text file {str(entry)!r}")
        rows.append({"name": entry.name, "path": str(entry), "text": text})
    return pd.DataFrame(rows)


def _folder_file(entry: Path, folder: Path, name: str) -> tuple[Path, Path]:
    """The entry and its real path, once it is known to be a regular file inside the folder with a UTF-8 name."""
    what = f"input {name!r}: file {quoted_name(entry.name)} of folder {str(folder)!r}"
    if not is_utf8_name(entry.name):
        raise InputPathError(f"{what} has a name that is not valid UTF-8; rename it")
    return entry, readable_file(entry, what=what, inside=[folder])
