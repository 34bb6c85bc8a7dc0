"""Labelled examples for `mp-pipelines eval`: reading a JSONL or CSV dataset, and scoring answers against it.

Nothing here imports Dagster: a bad dataset is refused (file, line or row, field, reason) before anything runs.

A JSONL row is `{"inputs": {...}, "expected": {task: value}}`. A CSV file has one column per input and one
`expected.<task>` column per labelled task; a dot in a column name nests (`expected.classify.category` is
`{"classify": {"category": ...}}`, `tickets.subject` is `{"tickets": {"subject": ...}}`), an empty cell is left
out, and a cell that starts with `[` or `{` is read as JSON. A `table` input may be given inline, as one row
(an object) or a list of rows; `eval` writes it to a JSONL file for the run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mp_pipelines.spec.models import WorkflowSpec

DATASET_SUFFIXES = (".jsonl", ".ndjson", ".csv")
ROW_FIELDS = ("inputs", "expected")


class DatasetError(ValueError):
    """A dataset that cannot be used: the message names the file, the line or row, the field and the reason."""


@dataclass
class Example:
    """One labelled example: the inputs of one run and the expected answer per task."""

    index: int  # 0-based position in the dataset
    where: str  # "line 3" (JSONL) or "row 2 (line 3)" (CSV), for messages
    inputs: dict[str, Any]  # as the dataset gives them (tables inline or as paths)
    expected: dict[str, Any] = field(default_factory=dict)


def task_names(spec: WorkflowSpec) -> list[str]:
    """Every name `run --json` reports a task under: tasks, loops and loop body tasks."""
    names = [step.name for step in spec.tasks]
    return names + [task.name for task in spec.all_tasks() if task.name not in names]


def read_dataset(path: str | Path, spec: WorkflowSpec) -> list[Example]:
    """The examples of a JSONL or CSV file, each checked against the workflow (inputs, task names); DatasetError
    for an unreadable file or a bad row, a file larger than MP_MAX_TABLE_BYTES or with more rows than
    MP_MAX_TABLE_ROWS, or a value longer than MP_MAX_INPUT_CHARS."""
    from mp_pipelines.spec.paths import InputPathError, readable_file
    from mp_pipelines.spec.size_limits import MAX_TABLE_BYTES, SizeLimitError

    shown = str(path)
    suffix = Path(shown).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise DatasetError(f"dataset {shown}: give a .jsonl or .csv file (rows of inputs and expected answers)")
    try:
        real = readable_file(shown, what=f"dataset {shown}")
        MAX_TABLE_BYTES.check(real.stat().st_size, f"dataset {shown}")
        text = real.read_text(encoding="utf-8")
    except (InputPathError, SizeLimitError) as exc:
        raise DatasetError(str(exc)) from None
    except UnicodeDecodeError:
        raise DatasetError(f"dataset {shown} is not UTF-8 text") from None
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {shown}: {exc.strerror or exc}") from None
    rows = _csv_rows(shown, text) if suffix == ".csv" else _jsonl_rows(shown, text)
    examples = [_example(shown, index, where, row, spec) for index, (where, row) in enumerate(rows)]
    if not examples:
        raise DatasetError(f"dataset {shown} has no examples")
    return examples


def _jsonl_rows(shown: str, text: str) -> list[tuple[str, Any]]:
    from mp_pipelines.spec.yaml_guard import shape_problem

    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        _check_row_count(shown, len(rows) + 1)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{shown}, line {number}: not JSON ({exc.msg} at column {exc.colno}); each line "
                               'holds one object {"inputs": {...}, "expected": {task: value}}') from None
        except RecursionError:
            row = None
            problem: str | None = "lists and objects are nested too deep"
        else:
            problem = shape_problem(row)
        if problem:
            raise DatasetError(f"{shown}, line {number}: {problem}")
        rows.append((f"line {number}", row))
    return rows


def _csv_rows(shown: str, text: str) -> list[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise DatasetError(f"{shown} has no header row; give one column per input and one expected.<task> column")
    header = [name.strip() for name in header]
    for column, name in enumerate(header, start=1):
        if not name or any(not part for part in name.split(".")):
            raise DatasetError(f"{shown}, header, column {column}: {name!r} is not a column name (input, "
                               "input.field or expected.<task>)")
        if header.count(name) > 1:
            raise DatasetError(f"{shown}, header: column {name!r} appears more than once")
    rows = []
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        where = f"row {len(rows) + 1} (line {line})"
        _check_row_count(shown, len(rows) + 1)
        if len(cells) != len(header):
            raise DatasetError(f"{shown}, {where}: {len(cells)} cells for {len(header)} columns")
        row: dict[str, Any] = {"inputs": {}, "expected": {}}
        for name, cell in zip(header, cells):
            if cell.strip() == "":
                continue
            parts = name.split(".")
            target, keys = (row["expected"], parts[1:]) if parts[0] == "expected" else (row["inputs"], parts)
            if not keys:
                raise DatasetError(f"{shown}, {where}, column 'expected': name the task (expected.<task>)")
            _put(target, keys, _cell(shown, where, name, cell))
        rows.append((where, row))
    return rows


def _cell(shown: str, where: str, column: str, cell: str) -> Any:
    """A CSV cell: JSON when it starts with `[` or `{`, else its text."""
    if cell.lstrip().startswith(("[", "{")):
        try:
            return json.loads(cell)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
            raise DatasetError(f"{shown}, {where}, column {column!r}: a cell starting with [ or {{ must be JSON "
                               f"({reason})") from None
    return cell


def _put(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _check_row_count(shown: str, count: int) -> None:
    from mp_pipelines.spec.size_limits import MAX_TABLE_ROWS, SizeLimitError

    try:
        MAX_TABLE_ROWS.check(count, f"dataset {shown}", verb="has", at_least=True)
    except SizeLimitError as exc:
        raise DatasetError(str(exc)) from None


def _example(shown: str, index: int, where: str, row: Any, spec: WorkflowSpec) -> Example:
    """Example of one row, after checking its fields, task names and inputs (the CLI's own input check)."""
    from mp_pipelines.cli.args import input_problems
    from mp_pipelines.spec.problems import suggest

    at = f"{shown}, {where}"
    if not isinstance(row, dict):
        raise DatasetError(f'{at}: a row must be an object {{"inputs": {{...}}, "expected": {{task: value}}}}')
    unknown = sorted(set(row) - set(ROW_FIELDS))
    if unknown:
        raise DatasetError(f"{at}, field {unknown[0]!r}: unknown; a row has {' and '.join(ROW_FIELDS)}"
                           f"{suggest(unknown[0], ROW_FIELDS)}")
    inputs, expected = row.get("inputs", {}), row.get("expected", {})
    for name, value in (("inputs", inputs), ("expected", expected)):
        if not isinstance(value, dict):
            raise DatasetError(f"{at}, field {name!r}: must be an object, not {type(value).__name__}")
    tasks = task_names(spec)
    for task in expected:
        if task not in tasks:
            raise DatasetError(f"{at}, field 'expected.{task}': unknown task {task!r} of {spec.name}; its tasks: "
                               f"{', '.join(tasks)}{suggest(task, tasks)}")
    typed = {name: _inline_table_stand_in(value) if name in spec.inputs and spec.inputs[name].type == "table"
             else value for name, value in inputs.items()}
    _, problems = input_problems(spec, typed)
    if problems:
        raise DatasetError(f"{at}, field 'inputs': {'; '.join(problems)}")
    for name, value in inputs.items():
        if spec.inputs[name].type == "table" and isinstance(value, (dict, list)):
            rows = value if isinstance(value, list) else [value]
            if not rows or not all(isinstance(r, dict) and r for r in rows):
                raise DatasetError(f"{at}, field 'inputs.{name}': an inline table is one row (an object) or a "
                                   "non-empty list of rows (objects); or give the path of a CSV/JSONL file")
    return Example(index, where, inputs, expected)


def _inline_table_stand_in(value: Any) -> Any:
    """What the input check sees for a table given inline (it is written to a .jsonl file before the run)."""
    return "inline.jsonl" if isinstance(value, (dict, list)) else value


# --- scoring ------------------------------------------------------------------------------------------------------

def normalized(value: Any) -> Any:
    """A value as answers are compared: text trimmed and case-folded, whole floats as integers, scalars as their
    JSON text (so the CSV cell "3" matches the number 3), objects and lists kept as such."""
    if isinstance(value, dict):
        return {str(k): normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return " ".join(text.split()).casefold()


def compared_answer(expected: Any, got: Any) -> Any:
    """The part of an answer a label is compared with: a one-item fan-out's single answer when the label is not a
    list (a fan-out's answer is the list of its items' answers)."""
    if not isinstance(expected, list) and isinstance(got, list) and len(got) == 1:
        return got[0]
    return got


def matches(expected: Any, got: Any) -> bool:
    """Whether an answer agrees with its label: objects on the keys the label gives (other keys, such as a free
    summary, are not compared), lists item by item, everything else as normalised text."""
    expected, got = normalized(expected), normalized(compared_answer(expected, got))
    return _agrees(expected, got)


def _agrees(expected: Any, got: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(got, dict) and all(key in got and _agrees(v, got[key]) for key, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(_agrees, expected, got))
    return expected == got


def judge_score(task: Mapping[str, Any]) -> float | None:
    """The judge's mean score (1–5) in a task's `run --json` summary (`checks: [{name, passed, severity,
    metadata: {mean_score, scores}}]`), or None when the task has no judge check that scored."""
    for check in task.get("checks") or []:
        metadata = check.get("metadata") or {}
        if isinstance(metadata.get("mean_score"), (int, float)):
            return float(metadata["mean_score"])
    return None
