"""Table inputs that cannot blow up memory and input files that cannot reach past their folder.

Limits are checked from a Parquet file's metadata before any data is read, then in bounded chunks that
stop as soon as a limit is passed; only regular files whose real path stays inside the folder given are
read, never /proc or /sys, devices or FIFOs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mp_pipelines.spec.inputs import check_table, load_table
from mp_pipelines.spec.paths import InputPathError, readable_file
from mp_pipelines.spec.size_limits import MAX_CELL_CHARS, MAX_TABLE_ROWS, SizeLimitError

MIB = 1 << 20


def write_parquet_bomb(path: Path, rows: int, cell_bytes: int, *, distinct: bool = False) -> None:
    """`rows` strings of `cell_bytes` letters: a few KB compressed, rows × cell_bytes once decoded.

    One value repeated (the default) is stored once, in the column's dictionary; distinct ones are stored each.
    """
    cells = [("abcdefghijklmnopqrstuvwxyz"[i % 26] if distinct else "x") * cell_bytes for i in range(rows)]
    table = pa.table({"id": list(range(rows)), "subject": ["s"] * rows, "body": cells})
    pq.write_table(table, path, compression="zstd")


def refuse_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any table data (not metadata) is read."""
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("table data was read")

    monkeypatch.setattr(pd, "read_parquet", fail)
    monkeypatch.setattr(pd, "read_csv", fail)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", fail)
    monkeypatch.setattr(pq.ParquetFile, "read", fail)


# --- limits from Parquet metadata -------------------------------------------------------------------------------


def test_defaults_of_the_new_limits() -> None:
    assert (MAX_TABLE_ROWS.value(), MAX_CELL_CHARS.value()) == (1_000_000, 1_000_000)


def test_parquet_rows_are_counted_from_the_metadata_before_any_data_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "rows.parquet"
    pd.DataFrame({"id": range(50), "text": ["t"] * 50}).to_parquet(table)
    refuse_reading(monkeypatch)
    with pytest.raises(SizeLimitError) as caught:
        load_table(table, name="tickets", max_rows=10)
    assert str(caught.value) == (f"input 'tickets': table {str(table)!r} has 50 rows, more than the limit 10 "
                                 "(the workflow's max_items)")
    monkeypatch.setenv("MP_MAX_TABLE_ROWS", "20")
    with pytest.raises(SizeLimitError) as caught:
        check_table(table, name="tickets")
    assert str(caught.value) == (f"input 'tickets': table {str(table)!r} has 50 rows, more than the limit 20 "
                                 "(MP_MAX_TABLE_ROWS); set MP_MAX_TABLE_ROWS to allow more")


def test_a_parquet_file_whose_uncompressed_columns_pass_the_limit_is_refused_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.parquet"
    write_parquet_bomb(bomb, rows=3, cell_bytes=300_000, distinct=True)  # 900 KB uncompressed
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "500000")
    assert bomb.stat().st_size < 10_000
    refuse_reading(monkeypatch)
    with pytest.raises(SizeLimitError, match=r"^input 'tickets': table '.*bomb.parquet' holds [\d,]+ bytes before "
                                             r"compression, more than the limit 500,000 \(MP_MAX_TABLE_BYTES\)"):
        load_table(bomb, name="tickets")


def test_a_long_parquet_cell_is_refused_from_the_column_statistics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "cells.parquet"
    pd.DataFrame({"id": [1, 2], "body": ["short", "y" * 150]}).to_parquet(table)
    monkeypatch.setenv("MP_MAX_CELL_CHARS", "100")
    refuse_reading(monkeypatch)
    with pytest.raises(SizeLimitError) as caught:
        check_table(table, name="tickets")
    assert str(caught.value) == (f"input 'tickets': table {str(table)!r}: a cell of column 'body' is 150 characters, "
                                 "more than the limit 100 (MP_MAX_CELL_CHARS); set MP_MAX_CELL_CHARS to allow more")


# --- the dictionary bomb: small metadata, huge once decoded ------------------------------------------------------


def test_a_parquet_dictionary_bomb_is_refused_by_its_decoded_size(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.parquet"
    write_parquet_bomb(bomb, rows=20, cell_bytes=200_000)  # one dictionary value: 200 KB in the metadata, 4 MB decoded
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "1000000")
    for read in (load_table, check_table):
        with pytest.raises(SizeLimitError, match=r"^input 'tickets': table '.*bomb.parquet' once decoded is at least "
                                                 r"[\d,]+ bytes, more than the limit 1,000,000 \(MP_MAX_TABLE_BYTES\)"):
            read(bomb, name="tickets")
    monkeypatch.setenv("MP_MAX_CELL_CHARS", "100000")
    with pytest.raises(SizeLimitError, match=r"a cell of column 'body' \(row 0\) is 200,000 characters, more than the "
                                             r"limit 100,000 \(MP_MAX_CELL_CHARS\)"):
        check_table(bomb, name="tickets")


PEAK_RSS = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import pandas, pyarrow.parquet
    from mp_pipelines.spec.inputs import check_table, load_table

    def memory(field):  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec); VmRSS: now
        return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    warm_up = Path(sys.argv[1]).with_name("warm_up.parquet")  # the modules a check imports count as the baseline
    pandas.DataFrame({"a": ["x"]}).to_parquet(warm_up)
    load_table(warm_up)
    before, rss_before = memory("VmHWM"), memory("VmRSS")
    outcome = {}
    for read in (check_table, load_table):
        try:
            read(sys.argv[1], name="tickets")
            outcome[read.__name__] = "read"
        except ValueError as exc:  # a SizeLimitError, or a column type refused
            outcome[read.__name__] = str(exc)
    print(json.dumps({"outcome": outcome, "grown": memory("VmHWM") - before, "held": memory("VmRSS") - rss_before}))
""")


def peak_rss_reading(table: Path, **settings: str) -> dict:
    """PEAK_RSS on `table` in a fresh process, with the default size limits except `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MP_MAX_")} | settings
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(table)], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    return json.loads(done.stdout)


def test_checking_and_loading_a_parquet_bomb_stays_small_in_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.parquet"
    write_parquet_bomb(bomb, rows=20, cell_bytes=30 * MIB)  # 600 MiB decoded, 30 MiB in the metadata
    assert bomb.stat().st_size < 50_000
    result = peak_rss_reading(bomb, MP_MAX_CELL_CHARS=str(100 * MIB))  # let the cells pass: the decoded size must stop it
    for name in ("check_table", "load_table"):
        assert "once decoded is at least" in result["outcome"][name], result
    # the one dictionary value (30 MiB) is decoded, never the 20 cells it stands for
    assert result["grown"] < 150 * MIB, f"peak RSS grew by {result['grown'] / MIB:.0f} MiB"
    # and what it took is handed back, so a long-lived process (the sensor's code server) does not keep it
    assert result["held"] < 40 * MIB, f"RSS after the checks is {result['held'] / MIB:.0f} MiB above where it started"


# --- nested and fixed-size columns: decided from the schema, before any data is read ------------------------------


def write_nested_parquet_bomb(path: Path, rows: int, cell_bytes: int) -> None:
    """A list<string> column whose every row holds one string of `cell_bytes` letters, the same one in each:
    a few KB compressed, rows × cell_bytes once decoded. Built from a dictionary, so the test holds one copy."""
    leaf = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["x" * cell_bytes]))
    lists = pa.ListArray.from_arrays(pa.array(range(rows + 1), pa.int32()), leaf)
    pq.write_table(pa.table({"id": list(range(rows)), "docs": lists}), path, compression="zstd", use_dictionary=True,
                   store_schema=False)  # its schema then is list<string>, as any writer of such a file gives


NESTED = {  # column type as the file's schema gives it: a value of it
    "list<element: string>": pa.array([["a", "b"], ["c"]], pa.list_(pa.string())),
    "large_list<element: int64>": pa.array([[1, 2], [3]], pa.large_list(pa.int64())),
    "struct<title: string, pages: int64>": pa.array([{"title": "a", "pages": 1}] * 2),
    "map<string, string>": pa.array([[("k", "v")], []], pa.map_(pa.string(), pa.string())),
    "list<element: struct<title: string, tags: list<element: string>>>":
        pa.array([[{"title": "a", "tags": ["x"]}], []]),
}


@pytest.mark.parametrize("kind", list(NESTED))
def test_a_nested_parquet_column_is_refused_before_any_data_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    table = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"], "docs": NESTED[kind]}), table)
    refuse_reading(monkeypatch)
    for read in (load_table, check_table):
        with pytest.raises(ValueError) as caught:
            read(table, name="tickets")
        assert str(caught.value) == (
            f"input 'tickets': table {str(table)!r}: column 'docs' has the nested type {kind}; table inputs take "
            "flat columns only (text, numbers, booleans, dates and times): store a nested value as JSON text in a "
            "string column")
        assert not isinstance(caught.value, SizeLimitError)


def test_a_nested_parquet_bomb_is_refused_without_being_decoded(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.parquet"
    write_nested_parquet_bomb(bomb, rows=20, cell_bytes=30 * MIB)  # 600 MiB decoded, 30 MiB in the metadata
    assert bomb.stat().st_size < 50_000
    result = peak_rss_reading(bomb)
    for name in ("check_table", "load_table"):
        assert "column 'docs' has the nested type list<element: string>" in result["outcome"][name], result
    # decided from the schema: not one value is decoded (decoding a batch of it took 1.2 GiB)
    assert result["grown"] < 30 * MIB, f"peak RSS grew by {result['grown'] / MIB:.0f} MiB"


def test_a_fixed_size_binary_column_is_measured_from_its_width_before_any_data_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "fixed.parquet"
    width = 400_000
    pq.write_table(pa.table({"blob": pa.array([b"x" * width] * 20, pa.binary(width))}), table, compression="zstd")
    assert table.stat().st_size < 10_000  # one dictionary value; the footer says 400 KB, it decodes to 8 MB
    refuse_reading(monkeypatch)
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "1000000")
    with pytest.raises(SizeLimitError) as caught:
        check_table(table, name="tickets")
    assert str(caught.value) == (f"input 'tickets': table {str(table)!r} once decoded is at least 8,000,000 bytes, "
                                 "more than the limit 1,000,000 (MP_MAX_TABLE_BYTES); set MP_MAX_TABLE_BYTES to "
                                 "allow more")
    monkeypatch.setenv("MP_MAX_CELL_CHARS", "100000")
    with pytest.raises(SizeLimitError, match=r"a cell of column 'blob' is 400,000 characters, more than the limit "
                                             r"100,000 \(MP_MAX_CELL_CHARS\)"):
        check_table(table, name="tickets")
    monkeypatch.undo()
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"key": pa.array([b"ab", b"cd"], pa.binary(2))}), small)
    assert check_table(small) == 2
    assert list(load_table(small)["key"]) == [b"ab", b"cd"]


# --- CSV and JSONL: bounded chunks that stop at the first limit passed -------------------------------------------


def test_csv_rows_are_counted_while_reading_and_reading_stops_at_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "long.csv"
    rows = "".join(f"{i},row {i}\n" for i in range(5000))
    table.write_text("id,text\n" + rows + "1,2,3,4,5\n")  # a malformed last line, past the limit
    monkeypatch.setenv("MP_MAX_TABLE_ROWS", "1000")
    with pytest.raises(SizeLimitError) as caught:
        load_table(table, name="tickets")
    assert str(caught.value) == (f"input 'tickets': table {str(table)!r} has at least 1,001 rows, more than the "
                                 "limit 1,000 (MP_MAX_TABLE_ROWS); set MP_MAX_TABLE_ROWS to allow more")
    monkeypatch.delenv("MP_MAX_TABLE_ROWS")
    with pytest.raises(SizeLimitError, match=r"has at least 11 rows, more than the limit 10 \(the workflow's max_items\)"):
        check_table(table, name="tickets", max_rows=10)
    with pytest.raises(ValueError, match="cannot read table"):  # the whole file is read when no limit stops it
        load_table(table, name="tickets")


def test_jsonl_reading_stops_at_the_row_limit(tmp_path: Path) -> None:
    table = tmp_path / "long.jsonl"
    lines = "".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(3000))
    table.write_text(lines + '{"id": 1, "text": \n')
    with pytest.raises(SizeLimitError, match=r"has at least 101 rows, more than the limit 100 \(the workflow's max_items\)"):
        load_table(table, name="tickets", max_rows=100)


def test_a_long_csv_or_jsonl_cell_names_its_column_and_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.DataFrame({"id": [1, 2, 3], "body": ["a", "b" * 101, "c"]})
    csv, jsonl = tmp_path / "t.csv", tmp_path / "t.jsonl"
    frame.to_csv(csv, index=False)
    frame.to_json(jsonl, orient="records", lines=True)
    monkeypatch.setenv("MP_MAX_CELL_CHARS", "100")
    for table in (csv, jsonl):
        with pytest.raises(SizeLimitError) as caught:
            load_table(table, name="tickets")
        assert str(caught.value) == (f"input 'tickets': table {str(table)!r}: a cell of column 'body' (row 1) is "
                                     "101 characters, more than the limit 100 (MP_MAX_CELL_CHARS); "
                                     "set MP_MAX_CELL_CHARS to allow more")


def test_nested_jsonl_values_count_in_full_in_the_decoded_size_and_their_length(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "nested.jsonl"
    records = [{"id": i, "tags": [f"tag {i} {j}" for j in range(500)], "meta": {"k": {"deep": [f"v{i}"] * 50}}}
               for i in range(200)]
    table.write_text("".join(json.dumps(record) + "\n" for record in records))
    frame = pd.read_json(table, lines=True)
    containers = int(frame.memory_usage(deep=True, index=False).sum())  # pandas counts the lists, not the strings
    limit = 3 * containers
    assert table.stat().st_size < limit
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", str(limit))
    with pytest.raises(SizeLimitError, match=rf"once decoded is at least [\d,]+ bytes, more than the limit {limit:,}"):
        check_table(table, name="tickets")
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", str(20 * limit))
    assert load_table(table)["tags"][3][:2] == ["tag 3 0", "tag 3 1"]
    monkeypatch.setenv("MP_MAX_CELL_CHARS", "1000")  # a nested value is as long as it prints
    with pytest.raises(SizeLimitError, match=r"a cell of column 'tags' \(row 100\) is 7,390 characters"):
        check_table(table, name="tickets")


def test_decoded_size_is_limited_and_a_table_within_the_limits_loads_as_a_whole_read_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = 25_000  # more than one chunk
    frame = pd.DataFrame({"id": range(rows), "a": [i % 7 for i in range(rows)], "b": [i % 3 for i in range(rows)],
                          "text": [f"row {i}" for i in range(rows)],
                          "score": [i / 4 if i % 7 else None for i in range(rows)]})
    csv, jsonl, parquet = tmp_path / "t.csv", tmp_path / "t.jsonl", tmp_path / "t.parquet"
    frame.to_csv(csv, index=False)
    frame.to_json(jsonl, orient="records", lines=True)
    frame.to_parquet(parquet)
    metadata = pq.ParquetFile(parquet).metadata
    uncompressed = sum(metadata.row_group(0).column(i).total_uncompressed_size for i in range(metadata.num_columns))
    for table, stored in ((csv, csv.stat().st_size), (parquet, uncompressed)):  # smaller than once decoded
        limit = stored + 1
        assert frame.memory_usage(deep=True, index=False).sum() > limit
        monkeypatch.setenv("MP_MAX_TABLE_BYTES", str(limit))
        with pytest.raises(SizeLimitError, match=rf"once decoded is at least [\d,]+ bytes, more than the limit {limit:,}"):
            load_table(table, name="tickets")
    monkeypatch.delenv("MP_MAX_TABLE_BYTES")
    pd.testing.assert_frame_equal(load_table(csv), pd.read_csv(csv))
    pd.testing.assert_frame_equal(load_table(jsonl), pd.read_json(jsonl, lines=True))
    pd.testing.assert_frame_equal(load_table(parquet), pd.read_parquet(parquet))
    assert [check_table(table) for table in (csv, jsonl, parquet)] == [rows] * 3


# --- paths: regular files inside the folder given ----------------------------------------------------------------


def test_a_documents_folder_never_reads_proc_through_a_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_CANARY", "sk-canary-must-not-leak")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello")
    (docs / "env.txt").symlink_to("/proc/self/environ")
    with pytest.raises(InputPathError) as caught:
        load_table(docs, name="documents")
    assert str(caught.value) == (f"input 'documents': file 'env.txt' of folder {str(docs)!r} leads to "
                                 f"'/proc/{os.getpid()}/environ' in /proc, which holds process and kernel state, not data; "
                                 "only regular files are read")
    assert "sk-canary" not in str(caught.value)


def test_a_link_out_of_the_folder_is_refused_and_one_inside_it_is_read(tmp_path: Path) -> None:
    docs, elsewhere = tmp_path / "docs", tmp_path / "elsewhere"
    docs.mkdir()
    elsewhere.mkdir()
    (docs / "a.txt").write_text("hello")
    (docs / "same.txt").symlink_to(docs / "a.txt")
    assert list(load_table(docs, name="documents")["name"]) == ["a.txt", "same.txt"]
    (elsewhere / "secret.txt").write_text("not for the model")
    (docs / "out.txt").symlink_to(elsewhere / "secret.txt")
    with pytest.raises(InputPathError) as caught:
        load_table(docs, name="documents")
    assert str(caught.value) == (f"input 'documents': file 'out.txt' of folder {str(docs)!r} leads to "
                                 f"{str(elsewhere / 'secret.txt')!r}, outside {str(docs)!r}; only files whose real "
                                 "path is inside it are read")


def test_fifos_and_devices_are_refused_not_opened(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello")
    os.mkfifo(docs / "pipe.txt")  # opening it to read would wait for a writer forever
    with pytest.raises(InputPathError, match=r"file 'pipe.txt' of folder '.*' is a FIFO \(named pipe\), not a regular "
                                             r"file; only regular files are read"):
        load_table(docs, name="documents")
    zeros = tmp_path / "zeros.csv"
    zeros.symlink_to("/dev/zero")
    with pytest.raises(InputPathError) as caught:
        load_table(zeros, name="tickets")
    assert str(caught.value) == (f"input 'tickets': table file {str(zeros)!r} is a character device, not a regular "
                                 "file; only regular files are read")


def test_a_table_file_linked_to_proc_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "env.csv"
    table.symlink_to("/proc/self/environ")
    with pytest.raises(InputPathError, match=r"^input 'tickets': table file '.*env.csv' leads to '/proc/\d+/environ' "
                                             r"in /proc, which holds process and kernel state"):
        load_table(table, name="tickets")


def test_a_document_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello")
    with open(os.path.join(os.fsencode(docs), b"bad\xffname.txt"), "w") as handle:
        handle.write("text")
    with pytest.raises(InputPathError) as caught:
        load_table(docs, name="documents")
    assert str(caught.value) == (f"input 'documents': file 'bad\\xffname.txt' of folder {str(docs)!r} has a name "
                                 "that is not valid UTF-8; rename it")


def test_readable_file_gives_the_real_path_of_a_regular_file_inside_a_root(tmp_path: Path) -> None:
    inner = tmp_path / "inbox"
    inner.mkdir()
    (inner / "a.csv").write_text("id\n1\n")
    (inner / "b.csv").symlink_to(inner / "a.csv")
    assert readable_file(inner / "b.csv", what="file 'b.csv'", inside=[inner]) == (inner / "a.csv").resolve()
    assert readable_file(inner / "a.csv", what="file 'a.csv'") == (inner / "a.csv").resolve()
    with pytest.raises(InputPathError, match=r"^file 'sys' leads to '/sys/kernel/.*' in /sys, which holds process and "
                                             r"kernel state, not data; only regular files are read$"):
        readable_file(Path("/sys/kernel/mm/transparent_hugepage/enabled"), what="file 'sys'")
    with pytest.raises(InputPathError, match=r"^file 'x' is a folder, not a regular file; only regular files are read$"):
        readable_file(inner, what="file 'x'")
