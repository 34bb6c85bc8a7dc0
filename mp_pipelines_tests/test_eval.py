"""`mp-pipelines eval`: labelled examples through real Dagster runs (simulated model, local SQLite instance).

How the expected numbers of the shipped set were computed, by hand, without running the tool
---------------------------------------------------------------------------------------------
`classify` of classify_tickets asks for JSON with an output schema, so the simulated model
(`llm/simulated.py`) answers with `_SchemaFaker`: an RNG `random.Random(int(sha256(body)[:16], 16))`, where
`body` is the request's `messages`, `model`, `temperature`, `max_tokens` and `response_format` as sorted-key
JSON, fills the schema's properties in order, so `category` is the RNG's first `choice` over the enum
[billing, bug, feature_request, account, other] (and `urgency` the second, over [low, medium, high]). The
request holds one user message, the rendered prompt "Classify this support ticket.\\nSubject: …\\nBody: …\\n…",
model gpt-4o-mini, temperature 0.0 and `{"type": "json_schema", "json_schema": {"name": "output", "schema":
<the task's output_schema>, "strict": false}}` (`llm/client.py`). `_simulated_category` below is that rule
written out again; it gave MODEL_CATEGORY. The shipped labels (LABELS) are what a person would answer. They agree
on examples 4 (105 "Invoice address wrong": billing), 11 (112 "Typo on pricing page": bug) and 18 (119 "Bulk
edit for tags": feature_request): accuracy 3/20 = 0.15, and the other 17 examples disagree.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from mp_pipelines.cli.eval import score
from mp_pipelines.cli.eval_data import Example, judge_score, matches
from mp_pipelines.cli.main import main

DATA = Path(__file__).resolve().parent.parent / "mp_pipelines" / "workflows" / "data"
SHIPPED_JSONL = DATA / "classify_tickets_eval.jsonl"
SHIPPED_CSV = DATA / "classify_tickets_eval.csv"
CATEGORIES = ["billing", "bug", "feature_request", "account", "other"]
# Example index → (the simulated model's category, the shipped label).
MODEL_CATEGORY = ["account", "other", "bug", "bug", "billing", "billing", "feature_request", "other", "bug",
                  "account", "bug", "bug", "feature_request", "billing", "bug", "feature_request", "feature_request",
                  "other", "feature_request", "account"]
LABELS = ["billing", "bug", "feature_request", "account", "billing", "bug", "bug", "feature_request", "account", "bug",
          "billing", "bug", "account", "other", "feature_request", "billing", "account", "bug", "feature_request",
          "other"]
RIGHT = [4, 11, 18]
WRONG = [i for i in range(20) if i not in RIGHT]


def _simulated_answer(subject: str, body: str) -> tuple[str, str]:
    """(category, urgency) the simulated model gives the classify prompt of one ticket (see the module docstring)."""
    schema = {"type": "object",
              "properties": {"category": {"enum": CATEGORIES}, "urgency": {"enum": ["low", "medium", "high"]},
                             "summary": {"type": "string"}},
              "required": ["category", "urgency", "summary"]}
    prompt = (f"Classify this support ticket.\nSubject: {subject}\nBody: {body}\nAnswer as JSON with `category` "
              "(billing, bug, feature_request, account or other), `urgency` (low, medium or high) and a one-line "
              "`summary`.")
    request = {"messages": [{"role": "user", "content": prompt}], "model": "gpt-4o-mini", "temperature": 0.0,
               "max_tokens": None,
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": schema, "strict": False}}}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    rng = random.Random(int(digest[:16], 16))
    return rng.choice(CATEGORIES), rng.choice(["low", "medium", "high"])


def _shipped_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SHIPPED_JSONL.read_text().splitlines()]


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # the CLI's local instance (and so the eval records) live under the working folder
    return CliRunner()


def _eval(runner: CliRunner, *args: str) -> tuple[int, dict[str, Any], str]:
    result = runner.invoke(main, ["eval", *args, "--json"])
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.exit_code, payload, result.output


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hand_computed_answers_follow_the_simulated_models_rule() -> None:
    """The table the other tests assert was computed from the model's rule, not copied from the tool's output."""
    rows = _shipped_rows()
    assert len(rows) == 20
    answers = [_simulated_answer(r["inputs"]["tickets"]["subject"], r["inputs"]["tickets"]["body"])[0] for r in rows]
    assert answers == MODEL_CATEGORY
    assert [r["expected"]["classify"]["category"] for r in rows] == LABELS
    assert [i for i in range(20) if MODEL_CATEGORY[i] == LABELS[i]] == RIGHT


def test_shipped_set_scores_the_hand_computed_accuracy_in_tagged_runs(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(SHIPPED_JSONL)])
    assert result.exit_code == 0, result.output
    # The text form: a table row per task (score, n, disagreements), then the disagreements.
    assert any(line.split()[:5] == ["classify", "accuracy", "0.150", "20", "17"] for line in result.stdout.splitlines())
    assert 'classify example 0: expected {"category": "billing"}; got {"category": "account"}\n' in result.stdout
    eval_id = result.stdout.split("recorded as ")[1].split(":")[0]
    home = tmp_path / ".mp_pipelines" / "dagster_home"
    report = json.loads((home / "evals" / f"{eval_id}.json").read_text())  # what --json prints, and more

    classify = report["tasks"]["classify"]
    assert (classify["accuracy"], classify["n"], classify["right"]) == (0.15, 20, 3)
    assert [d["example"] for d in classify["disagreements"]] == WRONG
    rows = _shipped_rows()
    for item in classify["disagreements"]:
        index = item["example"]
        assert item["expected"] == {"category": LABELS[index]}
        assert item["got"]["category"] == MODEL_CATEGORY[index]  # a one-item fan-out: its item's answer
        assert item["inputs"] == rows[index]["inputs"]
    assert list(report["tasks"]) == ["classify"]  # escalate has no labels and no judge check
    # One classify call per example, and an escalation note for each example the model marked urgent.
    urgent = sum(_simulated_answer(r["inputs"]["tickets"]["subject"], r["inputs"]["tickets"]["body"])[1] == "high"
                 for r in rows)
    usage = report["usage"]
    assert usage["calls"] + usage["cache_hits"] == 20 + urgent
    assert usage["prompt_tokens"] > 0 and usage["cost_usd"] > 0
    assert report["failed_runs"] == []

    # Each example ran as its own Dagster run, tagged with the eval id.
    import dagster as dg

    from mp_pipelines.cli.running import local_instance

    with local_instance() as instance:  # the CLI's instance under the working folder
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"mp/eval_id": eval_id}))
        assert len(runs) == 20 and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        assert sorted(int(r.tags["mp/eval_example"]) for r in runs) == list(range(20))
        by_example = {int(r.tags["mp/eval_example"]): r.run_id for r in runs}
    assert [e["run_id"] for e in report["examples"]] == [by_example[i] for i in range(20)]


def test_compare_prints_deltas_and_the_examples_that_changed(runner: CliRunner, tmp_path: Path) -> None:
    rows = _shipped_rows()[:5]  # right in the shipped labels: example 4 only → 1/5
    before = _write_jsonl(tmp_path / "before.jsonl", rows)
    relabelled = json.loads(json.dumps(rows))
    relabelled[0]["expected"]["classify"]["category"] = MODEL_CATEGORY[0]  # now right
    relabelled[1]["expected"]["classify"]["category"] = " OTHER "  # now right: trimmed and case-folded
    relabelled[4]["expected"]["classify"]["category"] = "bug"  # now wrong
    after = _write_jsonl(tmp_path / "after.jsonl", relabelled)
    code_a, a, out_a = _eval(runner, "classify_tickets", "--dataset", str(before))
    code_b, b, out_b = _eval(runner, "classify_tickets", "--dataset", str(after))
    assert (code_a, code_b) == (0, 0), out_a + out_b
    assert a["tasks"]["classify"]["accuracy"] == 0.2 and b["tasks"]["classify"]["accuracy"] == 0.4

    # The same five rows in the shipped CSV form give the same result.
    csv_rows = SHIPPED_CSV.read_text().splitlines()[:6]
    code_c, c, out_c = _eval(runner, "classify_tickets", "--dataset", str(_text(tmp_path / "before.csv", csv_rows)))
    assert code_c == 0, out_c

    def without_inputs(tasks: dict[str, Any]) -> dict[str, Any]:  # CSV cells are text: the id is "101", not 101
        return {name: {**task, "disagreements": [{k: v for k, v in d.items() if k != "inputs"}
                                                  for d in task["disagreements"]]} for name, task in tasks.items()}

    assert without_inputs(c["tasks"]) == without_inputs(a["tasks"])
    assert c["tasks"]["classify"]["disagreements"][0]["inputs"]["tickets"]["subject"] == "Charged twice"

    result = runner.invoke(main, ["eval", "--compare", a["eval_id"], b["eval_id"], "--json"])
    assert result.exit_code == 0, result.output
    diff = json.loads(result.stdout)
    task = diff["tasks"]["classify"]
    assert (task["metric"], task["a"], task["b"], task["delta"]) == ("accuracy", 0.2, 0.4, 0.2)
    assert [(c["example"], c["now"]) for c in task["changed"]] == [(0, "right"), (1, "right"), (4, "wrong")]
    assert diff["same_examples"] is True

    text = runner.invoke(main, ["eval", "--compare", a["eval_id"], b["eval_id"]])
    assert text.exit_code == 0, text.output
    assert any(line.split() == ["classify", "accuracy", "0.200", "0.400", "+0.200", "3"]
               for line in text.stdout.splitlines())
    assert "classify example 4: now wrong" in text.stdout

    unknown = runner.invoke(main, ["eval", "--compare", a["eval_id"], "ev-20990101-000000-abcdef"])
    assert unknown.exit_code == 2
    assert "no eval 'ev-20990101-000000-abcdef'" in unknown.output and a["eval_id"] in unknown.output
    traversal = runner.invoke(main, ["eval", "--compare", a["eval_id"], "../../etc/passwd"])
    assert traversal.exit_code == 2 and "no eval '../../etc/passwd'" in traversal.output
    mixed = runner.invoke(main, ["eval", "classify_tickets", "--compare", a["eval_id"], b["eval_id"]])
    assert mixed.exit_code == 2 and "--compare takes two eval ids" in mixed.output


def test_task_filter_and_a_failed_run(runner: CliRunner, tmp_path: Path) -> None:
    first = _shipped_rows()[4]  # the model answers billing, as labelled
    first["expected"]["escalate"] = "no such note"
    broken = {"inputs": {"tickets": "missing.csv"}, "expected": {"classify": {"category": "bug"}}}
    dataset = _write_jsonl(tmp_path / "set.jsonl", [first])
    code, report, output = _eval(runner, "classify_tickets", "--dataset", str(dataset), "--task", "classify")
    assert code == 0, output
    assert list(report["tasks"]) == ["classify"] and report["tasks"]["classify"]["accuracy"] == 1.0

    code, both, output = _eval(runner, "classify_tickets", "--dataset", str(dataset))
    assert code == 0, output
    assert list(both["tasks"]) == ["classify", "escalate"]
    escalate = both["tasks"]["escalate"]  # 105 is not urgent for the model, so escalate is skipped: no answer
    assert (escalate["accuracy"], escalate["n"], escalate["disagreements"][0]["got"]) == (0.0, 1, None)

    typo = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(dataset), "--task", "clasify"])
    assert typo.exit_code == 2 and "did you mean 'classify'" in typo.output

    failing = _write_jsonl(tmp_path / "failing.jsonl", [first, broken])
    code, report, output = _eval(runner, "classify_tickets", "--dataset", str(failing), "--task", "classify")
    assert code == 1, output
    assert [f["example"] for f in report["failed_runs"]] == [1] and "missing.csv" in report["failed_runs"][0]["error"]
    classify = report["tasks"]["classify"]
    assert (classify["accuracy"], classify["n"]) == (0.5, 2)
    assert classify["disagreements"][0]["example"] == 1 and "missing.csv" in classify["disagreements"][0]["error"]


REQUIRED_TOPIC = """\
name: needs_topic
inputs:
  topic: {type: string}
tasks:
  - name: answer
    prompt: "Say {{ inputs.topic }}"
"""


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", '{"inputs": {}, "expected": {}}\n{"inputs": \n',
     ["bad.jsonl, line 2: not JSON"]),
    ("task.jsonl", '{"inputs": {}, "expected": {"clasify": "bug"}}\n',
     ["task.jsonl, line 1, field 'expected.clasify': unknown task 'clasify'", "did you mean 'classify'"]),
    ("input.jsonl", '{"inputs": {"ticket": "a.csv"}, "expected": {"classify": "bug"}}\n',
     ["input.jsonl, line 1, field 'inputs': unknown input(s) ticket", "did you mean 'tickets'"]),
    ("field.jsonl", '{"inputs": {}, "expect": {"classify": "bug"}}\n',
     ["field.jsonl, line 1, field 'expect': unknown", "did you mean 'expected'"]),
    ("rows.jsonl", '{"inputs": {"tickets": [1, 2]}, "expected": {"classify": "bug"}}\n',
     ["rows.jsonl, line 1, field 'inputs.tickets': an inline table is one row"]),
    ("cell.csv", 'tickets.subject,expected.classify\nHi,{"category": \n',
     ["cell.csv, row 1 (line 2), column 'expected.classify': a cell starting with [ or { must be JSON"]),
    ("short.csv", "tickets.subject,tickets.body,expected.classify\nHi,there\n",
     ["short.csv, row 1 (line 2): 2 cells for 3 columns"]),
    ("csvtask.csv", "tickets.subject,expected.clasify\nHi,bug\n",
     ["csvtask.csv, row 1 (line 2), field 'expected.clasify': unknown task"]),
    ("set.txt", "whatever", ["dataset", "set.txt: give a .jsonl or .csv file"]),
    ("empty.jsonl", "\n", ["empty.jsonl has no examples"]),
])
def test_bad_datasets_are_refused_before_anything_runs(runner: CliRunner, tmp_path: Path, name: str, content: str,
                                                       message: list[str]) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(path)])
    assert result.exit_code == 2, result.output
    for part in message:
        assert part in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / ".mp_pipelines").exists()  # nothing ran


def test_missing_required_input_unreadable_and_oversized_datasets(runner: CliRunner, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    workflow = tmp_path / "needs_topic.yaml"
    workflow.write_text(REQUIRED_TOPIC)
    dataset = _write_jsonl(tmp_path / "set.jsonl", [{"inputs": {"topic": "a"}, "expected": {"answer": "x"}},
                                                    {"inputs": {}, "expected": {"answer": "x"}}])
    result = runner.invoke(main, ["eval", str(workflow), "--dataset", str(dataset)])
    assert result.exit_code == 2
    assert "set.jsonl, line 2, field 'inputs': input 'topic' of needs_topic is required (string)" in result.output

    missing = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "nope.jsonl does not exist" in missing.output
    link = tmp_path / "environ.jsonl"
    os.symlink("/proc/self/environ", link)
    refused = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(link)])
    assert refused.exit_code == 2 and "/proc" in refused.output and "not data" in refused.output

    outside = _write_jsonl(tmp_path / "outside.jsonl", [
        {"inputs": {"tickets": {"subject": "a", "body": "b"}}, "expected": {"classify": "bug"}},
        {"inputs": {"tickets": "/var/tickets.csv"}, "expected": {"classify": "bug"}}])
    result = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(outside)])
    assert result.exit_code == 2
    assert "outside.jsonl, line 2, field 'inputs': " in result.output and "outside the allowed input roots" in result.output
    from mp_pipelines.cli.running import local_instance

    with local_instance() as instance:  # refused before the first example ran
        assert instance.get_runs() == []

    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "50")
    big = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(SHIPPED_JSONL)])
    assert big.exit_code == 2 and "MP_MAX_TABLE_BYTES" in big.output
    monkeypatch.setenv("MP_MAX_TABLE_ROWS", "3")
    monkeypatch.delenv("MP_MAX_TABLE_BYTES")
    many = runner.invoke(main, ["eval", "classify_tickets", "--dataset", str(SHIPPED_CSV)])
    assert many.exit_code == 2 and "MP_MAX_TABLE_ROWS" in many.output


def test_matching_rule() -> None:
    assert matches(" Billing ", "billing")  # labels: trimmed and case-folded
    assert matches("3", 3) and matches(1, 1.0) and matches("true", True)  # CSV cells meet typed answers
    assert matches({"category": "bug"}, {"category": "BUG", "summary": "free text"})  # only the keys labelled
    assert not matches({"category": "bug", "urgency": "high"}, {"category": "bug", "urgency": "low"})
    assert matches({"category": "bug"}, [{"category": "bug", "urgency": "low"}])  # a one-item fan-out
    assert not matches({"category": "bug"}, [{"category": "bug"}, {"category": "bug"}])
    assert matches([{"category": "bug"}, "x"], [{"category": "bug", "id": 1}, " X"])
    assert not matches(["a"], ["a", "b"])
    assert not matches("billing", None) and matches(None, None)


def test_judge_mean_score_from_the_checks_of_run_json() -> None:
    """Tasks without labels are scored by their judge check, read from `run --json`'s
    `tasks.<t>.checks: [{name, passed, severity, metadata: {mean_score, scores}}]` (fabricated summaries here)."""

    def outcome(index: int, mean: float, passed: bool) -> Any:
        check = {"name": "judge", "passed": passed, "severity": "error",
                 "metadata": {"mean_score": mean, "scores": [mean]}}
        other = {"name": "non_empty", "passed": True, "severity": "error", "metadata": {}}
        return SimpleNamespace(run_id=f"r{index}", status="success", success=True, failure_summary=lambda: "",
                               tasks={"report": {"status": "success", "output": f"text {index}",
                                                 "checks": [other, check]}})

    assert judge_score({"checks": [{"name": "judge", "metadata": {"mean_score": 4, "scores": [4]}}]}) == 4.0
    assert judge_score({"checks": [{"name": "non_empty", "metadata": {}}]}) is None
    examples = [Example(i, f"line {i + 1}", {"topic": str(i)}) for i in range(3)]
    record = score("ev-x", "w", "d.jsonl", examples, [outcome(0, 4.0, True), outcome(1, 2.0, False),
                                                       outcome(2, 4.5, True)], ["report"])
    report = record["tasks"]["report"]
    assert report["mean_score"] == pytest.approx(3.5) and report["n"] == 3
    assert [d["example"] for d in report["disagreements"]] == [1]  # its judge check failed
    assert report["disagreements"][0]["score"] == 2.0


def test_the_shipped_csv_and_jsonl_hold_the_same_examples() -> None:
    from mp_pipelines.cli.eval_data import read_dataset
    from mp_pipelines.spec.loader import load_workflows

    spec = load_workflows().specs["classify_tickets"]
    from_jsonl, from_csv = read_dataset(SHIPPED_JSONL, spec), read_dataset(SHIPPED_CSV, spec)
    assert [e.expected for e in from_csv] == [e.expected for e in from_jsonl] == [
        {"classify": {"category": label}} for label in LABELS]
    for a, b in zip(from_jsonl, from_csv):
        assert {**a.inputs["tickets"], "id": str(a.inputs["tickets"]["id"])} == b.inputs["tickets"]
    assert from_csv[0].where == "row 1 (line 2)" and from_jsonl[0].where == "line 1"
    with SHIPPED_CSV.open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 20


JUDGED = """\
name: judged_notes
inputs:
  topic: {type: string}
tasks:
  - name: note
    prompt: "One sentence about {{ inputs.topic }}."
    checks:
      - {type: judge, rubric: "Is it one clear sentence about the topic?", min_score: 3}
"""


def test_a_task_without_labels_is_scored_by_its_judge_check(runner: CliRunner, tmp_path: Path) -> None:
    workflow = tmp_path / "judged_notes.yaml"
    workflow.write_text(JUDGED)
    topics = ["tides", "glaciers", "lichens", "comets"]
    dataset = _write_jsonl(tmp_path / "topics.jsonl", [{"inputs": {"topic": t}} for t in topics])
    code, report, output = _eval(runner, str(workflow), "--dataset", str(dataset))
    assert code == 0, output
    assert list(report["tasks"]) == ["note"]
    note = report["tasks"]["note"]
    assert note["n"] == 4 and "accuracy" not in note
    record = json.loads((tmp_path / ".mp_pipelines" / "dagster_home" / "evals" / f"{report['eval_id']}.json")
                        .read_text())
    scores = [example["results"]["note"]["mean_score"] for example in record["examples"]]
    assert all(1 <= score <= 5 for score in scores)  # one judge verdict per example, from each run's check
    assert note["mean_score"] == pytest.approx(sum(scores) / 4, abs=1e-4)
    assert [d["example"] for d in note["disagreements"]] == [i for i, s in enumerate(scores) if s < 3]
    assert report["checks_usage"]["calls"] == 4  # one judge call per example, counted apart from the tasks'
    assert report["usage"]["calls"] == 4


def test_compare_of_judged_tasks_lists_the_examples_whose_score_changed() -> None:
    from mp_pipelines.cli.eval_store import compare_evals, compare_text

    def record(eval_id: str, scores: list[float]) -> dict[str, Any]:
        return {"eval_id": eval_id, "workflow": "w", "dataset": "d.jsonl",
                "tasks": {"note": {"mean_score": sum(scores) / len(scores), "n": len(scores), "disagreements": []}},
                "examples": [{"index": i, "inputs": {"topic": str(i)}, "results": {"note": {"mean_score": s}}}
                             for i, s in enumerate(scores)]}

    diff = compare_evals(record("A", [3.0, 3.0]), record("B", [4.0, 3.0]))
    assert diff["tasks"]["note"] == {"metric": "mean_score", "a": 3.0, "b": 3.5, "delta": 0.5, "n_a": 2, "n_b": 2,
                                     "changed": [{"example": 0, "score_a": 3.0, "score_b": 4.0}]}
    text = compare_text(diff)
    assert any(line.split() == ["note", "mean_score", "3.000", "3.500", "+0.500", "1"] for line in text.splitlines())
    assert "note example 0: judge score 3.0 → 4.0" in text
