"""Fuzzing what launchers control: table files and inbox file names.

Whatever a table file holds, `load_table` gives a DataFrame or a ValueError naming the input (never another
exception, never a traceback for the user); whatever names the files in an inbox have, one scan decides about
every one of them, never raises, and takes exactly the usable ones. Derandomized: CI runs the same examples.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mp_pipelines.sensors.inbox import PARTIAL_SUFFIXES, UNTAGGABLE_CHARACTERS, scan_inbox
from mp_pipelines.spec.inputs import check_table, load_table
from mp_pipelines.spec.paths import is_utf8_name

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CELLS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40))
RAW = st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode))


def assert_loads_or_names_the_input(path: Path) -> None:
    """A DataFrame, or a ValueError whose message names the input."""
    try:
        frame = load_table(path, name="tickets", max_rows=50)
    except ValueError as exc:
        assert "tickets" in str(exc), str(exc)
        return
    assert isinstance(frame, pd.DataFrame) and len(frame) <= 50
    assert check_table(path, name="tickets", max_rows=50) == len(frame)


@FUZZ
@given(raw=RAW, suffix=st.sampled_from([".csv", ".jsonl"]))
@example(raw=b"a,b\n1,2\n3", suffix=".csv")
@example(raw=b'{"a": 1}\n[1, 2]\n', suffix=".jsonl")
@example(raw=b"\xff\xfe\x00", suffix=".csv")
def test_any_text_table_loads_or_is_refused_by_name(tmp_path: Path, raw: bytes, suffix: str) -> None:
    path = tmp_path / f"t{suffix}"
    path.write_bytes(raw)
    assert_loads_or_names_the_input(path)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "id", "a b", ""]), CELLS, max_size=4), max_size=80))
def test_any_records_as_jsonl_or_parquet_load_or_are_refused_by_name(tmp_path: Path, rows: list[dict]) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    assert_loads_or_names_the_input(jsonl)
    try:
        frame = pd.DataFrame(rows)
        buffer = io.BytesIO()
        frame.to_parquet(buffer)
    except (ValueError, TypeError, ArithmeticError, ImportError, Exception):  # noqa: BLE001 - pyarrow refuses mixed columns
        return  # not a Parquet file pandas can write: nothing to read back
    parquet = tmp_path / "t.parquet"
    parquet.write_bytes(buffer.getvalue())
    assert_loads_or_names_the_input(parquet)


NAMES = st.one_of(
    st.text(min_size=1, max_size=30).filter(lambda s: "/" not in s and "\x00" not in s and s not in (".", "..")),
    st.binary(min_size=1, max_size=30).filter(lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b".."))
    .map(os.fsdecode),
)


@FUZZ
@given(names=st.lists(NAMES, min_size=1, max_size=6, unique=True))
@example(names=[os.fsdecode(b"bad\xffutf8"), "good"])
@example(names=["a:b", "x...y", "tab\there", "ok"])
def test_any_file_names_in_the_inbox_are_decided_one_by_one(tmp_path_factory: pytest.TempPathFactory,
                                                            names: list[str]) -> None:
    """Every visible file is taken or skipped with a reason; a bad name never stops the scan or the others."""
    folder = tmp_path_factory.mktemp("inbox")
    written = []
    for index, stem in enumerate(names):
        name = stem + ".csv"  # the name is what is fuzzed; the suffix makes every file a candidate table
        try:
            (folder / name).write_bytes(f"id,text\n{index},hello\n".encode())  # distinct content: no duplicates
        except OSError:  # a name this file system refuses (too long in bytes)
            continue
        written.append(name)
    scan = scan_inbox(folder, {}, check_table=lambda path: None, settle_seconds=0.0, now=1e12)
    visible = [n for n in written if not n.startswith(".") and not n.lower().endswith(PARTIAL_SUFFIXES)]
    assert len(scan.files) == len(visible), (visible, scan.files, scan.messages)
    usable = {n for n in visible if is_utf8_name(n) and not any(s in n for s in UNTAGGABLE_CHARACTERS)}
    assert {batch.name for batch in scan.batches} == usable
    for state in scan.files.values():
        assert state.outcome == "submitted" or state.reason, state
