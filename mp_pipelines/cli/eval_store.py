"""Eval records: one JSON file per `mp-pipelines eval` under the Dagster instance's folder (`<home>/evals/`), and
the per-task difference between two of them (`eval --compare`). No Dagster imports."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

EVALS_FOLDER = "evals"
_EVAL_ID = re.compile(r"^ev-\d{8}-\d{6}-[0-9a-f]{6}$")


class EvalNotFound(LookupError):
    """No stored eval has the id given; the message names the folder and the latest ids."""


def new_eval_id(workflow: str, dataset: str) -> str:
    """`ev-YYYYMMDD-HHMMSS-xxxxxx`: the UTC time, and a hash of the workflow, dataset and a random nonce."""
    nonce = os.urandom(8).hex()
    digest = hashlib.sha256(f"{workflow}\0{dataset}\0{nonce}".encode()).hexdigest()[:6]
    return f"ev-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest}"


def evals_folder(home: str | Path) -> Path:
    return Path(home) / EVALS_FOLDER


def save_eval(home: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` as `<home>/evals/<eval_id>.json` (written whole, then renamed into place)."""
    folder = evals_folder(home)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['eval_id']}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, ensure_ascii=False, default=str, indent=1), encoding="utf-8")
    partial.replace(path)
    return path


def load_eval(home: str | Path, eval_id: str) -> dict[str, Any]:
    """The stored eval `eval_id`; EvalNotFound naming the folder and the latest stored ids when there is none."""
    folder = evals_folder(home)
    path = folder / f"{eval_id}.json"
    if _EVAL_ID.match(eval_id) and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    known = sorted(p.stem for p in folder.glob("ev-*.json")) if folder.is_dir() else []
    latest = ", ".join(known[-5:]) if known else "none yet (run `mp-pipelines eval WORKFLOW --dataset F` first)"
    raise EvalNotFound(f"no eval {eval_id!r} in {folder}; latest: {latest}")


def score_of(task: dict[str, Any]) -> tuple[str, float | None]:
    """("accuracy" or "mean_score", its value) of a task's eval summary."""
    kind = "accuracy" if "accuracy" in task else "mean_score"
    return kind, task.get(kind)


def compare_evals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per task of either eval: its score in A and B, the delta, and the examples whose verdict changed (right in A
    and wrong in B, or the other way), matched by their position in the dataset."""
    tasks: dict[str, Any] = {}
    for name in [*a["tasks"], *(t for t in b["tasks"] if t not in a["tasks"])]:
        ta, tb = a["tasks"].get(name), b["tasks"].get(name)
        kind, score_a = score_of(ta) if ta else score_of(tb)
        score_b = tb.get(kind) if tb else None
        delta = None if score_a is None or score_b is None else round(score_b - score_a, 6)
        entry: dict[str, Any] = {"metric": kind, "a": score_a, "b": score_b, "delta": delta,
                                 "n_a": ta["n"] if ta else 0, "n_b": tb["n"] if tb else 0}
        entry["changed"] = _changed(a, b, name) if kind == "accuracy" else _rescored(a, b, name)
        tasks[name] = entry
    same = [e.get("inputs") for e in a.get("examples", [])] == [e.get("inputs") for e in b.get("examples", [])]
    return {"a": _about(a), "b": _about(b), "same_examples": same, "tasks": tasks,
            "usage": {"a": a.get("usage", {}), "b": b.get("usage", {})}}


def _about(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in ("eval_id", "workflow", "dataset", "created")}


def _changed(a: dict[str, Any], b: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Examples of `task` judged right in one eval and wrong in the other."""
    verdicts_a, verdicts_b = _verdicts(a, task), _verdicts(b, task)
    changed = []
    for index in sorted(set(verdicts_a) & set(verdicts_b)):
        (right_a, got_a, expected), (right_b, got_b, _) = verdicts_a[index], verdicts_b[index]
        if right_a != right_b:
            changed.append({"example": index, "now": "right" if right_b else "wrong", "expected": expected,
                            "got_a": got_a, "got_b": got_b})
    return changed


def _rescored(a: dict[str, Any], b: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Examples of a judged `task` whose judge score differs between the two evals."""
    def scores(record: dict[str, Any]) -> dict[int, Any]:
        return {e["index"]: (e.get("results") or {}).get(task, {}).get("mean_score") for e in record.get("examples", [])}

    score_a, score_b = scores(a), scores(b)
    return [{"example": i, "score_a": score_a[i], "score_b": score_b[i]}
            for i in sorted(set(score_a) & set(score_b)) if score_a[i] != score_b[i]]


def _verdicts(record: dict[str, Any], task: str) -> dict[int, tuple[bool, Any, Any]]:
    out = {}
    for example in record.get("examples", []):
        result = (example.get("results") or {}).get(task)
        if result is not None:
            out[example["index"]] = (result["match"], result.get("got"), result.get("expected"))
    return out


def compare_text(diff: dict[str, Any]) -> str:
    """The comparison as a short table, then the examples that changed."""
    a, b = diff["a"], diff["b"]
    lines = [f"A {a['eval_id']} ({a['workflow']}, {a['dataset']})", f"B {b['eval_id']} ({b['workflow']}, {b['dataset']})"]
    if not diff["same_examples"]:
        lines.append("note: the two evals ran different examples; examples are matched by position")
    rows = [("task", "metric", "A", "B", "delta", "changed")]
    for name, entry in diff["tasks"].items():
        changed = entry.get("changed")
        rows.append((name, entry["metric"], _number(entry["a"]), _number(entry["b"]), _number(entry["delta"], True),
                     "-" if changed is None else str(len(changed))))
    lines += table(rows)
    for name, entry in diff["tasks"].items():
        for change in entry.get("changed") or []:
            if "score_a" in change:
                lines.append(f"  {name} example {change['example']}: judge score {change['score_a']} → "
                             f"{change['score_b']}")
                continue
            lines.append(f"  {name} example {change['example']}: now {change['now']} (expected "
                         f"{short(change['expected'])}; A got {short(change['got_a'])}; B got {short(change['got_b'])})")
    return "\n".join(lines)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as left-aligned columns."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def short(value: Any, limit: int = 80) -> str:
    """A value as one line of JSON, cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
