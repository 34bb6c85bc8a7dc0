"""Quality checks (`checks:` on a task): the spec and its validation, each built-in check over hand-made answers,
the judge through the real call path, the Dagster asset checks (blocking or not) and `run --json`'s report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner

from mp_pipelines.cli.check_report import attach_checks, check_evaluations, failed_check_lines
from mp_pipelines.cli.main import main
from mp_pipelines.cli.reporting import step_states
from mp_pipelines.factory.checks import build_asset_checks
from mp_pipelines.factory.names import checks_step
from mp_pipelines.factory.ops import asset_key
from mp_pipelines.factory.resources import RunBudget
from mp_pipelines.llm.resource import build_llm_resource
from mp_pipelines.spec.checks import check_names
from mp_pipelines.spec.loader import load_workflow_file, parse_workflow
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.problems import WorkflowValidationError
from mp_pipelines.tasks.checks import evaluate_all, parse_score, task_answers


def _spec(checks: list[dict[str, Any]], *, fan_out: bool = False, **task: Any) -> WorkflowSpec:
    first = {"name": "draft", "prompt": "Say {{ item }}" if fan_out else "Say hi", "checks": checks, **task}
    if fan_out:
        first["for_each"] = "inputs.topics"
    return parse_workflow({"name": "checked", "inputs": {"topics": {"type": "list", "default": ["a", "b", "c"]}},
                           "tasks": [first, {"name": "final", "prompt": "Use {{ draft }}", "depends_on": ["draft"]}]})


def _outcome(check: dict[str, Any], value: Any, **task: Any) -> Any:
    spec = _spec([check], **task)
    (outcome,) = evaluate_all(spec.tasks[0], value)
    return outcome


# --- each built-in check, passing and failing, on hand-made answers --------------------------------------------

CASES = [
    ({"type": "non_empty"}, "some text", "   "),
    ({"type": "non_empty"}, {"a": 1}, {}),
    ({"type": "max_chars", "value": 5}, "12345", "123456"),
    ({"type": "min_chars", "value": 3}, "abc", "ab"),
    ({"type": "matches", "pattern": r"^Category: \w+$"}, "Category: billing", "category billing"),
    ({"type": "in_set", "values": ["billing", "bug"]}, " billing\n", "refund"),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["label"]}}, {"label": "x"}, {"name": "x"}),
    ({"type": "json_schema", "schema": {"type": "object"}}, '{"label": "x"}', "not json"),
]


@pytest.mark.parametrize(("check", "good", "bad"), CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_each_check_passes_on_a_good_answer_and_fails_on_a_bad_one(check: dict[str, Any], good: Any, bad: Any) -> None:
    passing, failing = _outcome(check, good), _outcome(check, bad)
    assert passing.passed and passing.metadata["failed_answers"] == 0 and "failing_items" not in passing.metadata
    assert not failing.passed and failing.metadata["failed_answers"] == 1
    assert failing.metadata["failing_items"][0]["item"] == "draft"
    assert failing.description.startswith("failed: ")


def test_json_schema_check_uses_the_task_output_schema_and_min_ratio() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    spec = _spec([{"type": "json_schema", "min_ratio": 0.6}], fan_out=True, output="json", output_schema=schema)
    (outcome,) = evaluate_all(spec.tasks[0], [{"n": 1}, {"n": "two"}, {"n": 3}])
    assert outcome.passed and outcome.metadata["ratio"] == pytest.approx(2 / 3, abs=1e-3)
    assert outcome.metadata["schema"] == "task output_schema"
    assert outcome.metadata["failing_items"][0]["item"] == "draft[1]"
    assert "/n" in outcome.metadata["failing_items"][0]["reason"]
    (strict,) = evaluate_all(_spec([{"type": "json_schema", "min_ratio": 0.7}], fan_out=True, output="json",
                                   output_schema=schema).tasks[0], [{"n": 1}, {"n": "two"}, {"n": 3}])
    assert not strict.passed


def test_unique_ratio_counts_distinct_answers_and_names_the_repeats() -> None:
    spec = _spec([{"type": "unique_ratio", "min_ratio": 0.75}], fan_out=True)
    (outcome,) = evaluate_all(spec.tasks[0], ["a", "b", "a ", "c"])
    assert outcome.passed and outcome.metadata["ratio"] == 0.75
    assert outcome.metadata["failing_items"] == [{"item": "draft[2]", "index": 2, "reason": "same answer as [0]",
                                                  "answer": "a "}]
    (strict,) = evaluate_all(_spec([{"type": "unique_ratio"}], fan_out=True).tasks[0], ["a", "b", "a ", "c"])
    assert not strict.passed and "draft[2]: same answer as [0]" in strict.description


def test_a_fan_out_is_checked_per_item_with_the_failing_items_named_first_n() -> None:
    spec = _spec([{"type": "max_chars", "value": 3}], fan_out=True)
    answers = ["ok", None, *[f"long answer {i}" for i in range(30)]]
    (outcome,) = evaluate_all(spec.tasks[0], answers)
    assert not outcome.passed
    assert outcome.metadata["answers"] == 31 and outcome.metadata["skipped_items"] == 1  # None: skipped by `when`
    assert len(outcome.metadata["failing_items"]) == 20 and outcome.metadata["failing_items"][0]["item"] == "draft[2]"
    assert "1 of 31 answers pass" in outcome.description and "… 25 more" in outcome.description
    json.dumps(outcome.metadata)  # JSON-ready


def test_a_table_fan_out_checks_its_result_column_and_leaves_out_skipped_rows() -> None:
    spec = _spec([{"type": "in_set", "values": ["bug", "billing"]}], fan_out=True)
    frame = pd.DataFrame({"ticket": ["t1", "t2", "t3"], "result": ["bug", "spam", None],
                          "item_status": ["success", "success", "skipped"]})
    answers, skipped = task_answers(spec.tasks[0], frame)
    assert [(a.index, a.value) for a in answers] == [(0, "bug"), (1, "spam")] and skipped == 1
    (outcome,) = evaluate_all(spec.tasks[0], frame)
    assert not outcome.passed and outcome.metadata["failing_items"][0]["item"] == "draft[1]"


def test_check_names_default_to_the_type_numbered_when_repeated() -> None:
    spec = _spec([{"type": "matches", "pattern": "a"}, {"type": "matches", "pattern": "b", "name": "matches_2"},
                  {"type": "matches", "pattern": "c"}, {"type": "non_empty", "name": "filled"}])
    assert check_names(spec.tasks[0].checks) == ["matches", "matches_2", "matches_3", "filled"]


@pytest.mark.parametrize(("text", "score"), [
    ({"score": 4, "reason": "fine"}, 4.0), ({"score": "5"}, 5.0), ('{"score": 2}', 2.0), ("Score: 3/5", 3.0),
    ("I would give it a 4 out of 5.", 4.0), ({"score": 9}, None), ("no idea", None), ("", None),
])
def test_judge_scores_are_parsed_robustly(text: Any, score: float | None) -> None:
    assert parse_score(text) == score


# --- validation: file, field path, reason --------------------------------------------------------------------

BAD_CHECKS = """
name: bad_checks
tasks:
  - name: draft
    prompt: Write a note.
    checks:
      - {type: matches, pattern: "(unclosed"}
      - {type: judge}
      - {type: no_such_check}
      - {type: unique_ratio, min_ratio: 1.5}
      - {type: judge, rubric: "Is it kind?", min_score: 6}
      - {type: json_schema, schema: {type: 12}}
      - {type: json_schema}
      - {type: max_chars}
      - {type: max_chars, value: 10, pattern: x}
      - {type: non_empty, name: filled}
      - {type: non_empty, name: filled}
"""

EXPECTED_PROBLEMS = [
    ("tasks[0] (draft).checks[0].pattern", "is not a valid regular expression"),
    ("tasks[0] (draft).checks[1].rubric", "a judge check needs rubric"),
    ("tasks[0] (draft).checks[2].type", "input should be 'non_empty', 'max_chars'"),
    ("tasks[0] (draft).checks[3].min_ratio", "less than or equal to 1"),
    ("tasks[0] (draft).checks[4].min_score", "less than or equal to 5"),
    ("tasks[0] (draft).checks[5].schema", "schema is not a valid JSON Schema"),
    ("tasks[0] (draft).checks[6].schema", "a json_schema check needs schema"),
    ("tasks[0] (draft).checks[7].value", "a max_chars check needs value"),
    ("tasks[0] (draft).checks[8].pattern", "pattern does not apply to a max_chars check"),
    ("tasks[0] (draft).checks[10] (filled).name", "check name 'filled' is already used by checks[9]"),
]


def test_every_check_problem_is_reported_with_file_field_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad_checks.yaml"
    path.write_text(BAD_CHECKS)
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(path)
    problems = caught.value.problems
    assert all(p.file == str(path) for p in problems)
    for want, reason in EXPECTED_PROBLEMS:
        assert any(p.path == want and reason in p.message for p in problems), (want, [str(p) for p in problems])
    assert len(problems) == len(EXPECTED_PROBLEMS) and not caught.value.notes


def test_validate_command_reports_check_problems_without_a_traceback(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad_checks.yaml").write_text(BAD_CHECKS)
    result = CliRunner().invoke(main, ["validate", "bad_checks.yaml"])
    assert result.exit_code == 1, result.output  # `validate`: 1 when a workflow has problems (see --help)
    assert "bad_checks.yaml: tasks[0] (draft).checks[1].rubric: a judge check needs rubric" in result.output
    assert "Traceback" not in result.output


def test_a_valid_spec_with_checks_round_trips_through_yaml() -> None:
    spec = _spec([{"type": "json_schema", "schema": {"type": "object"}}, {"type": "judge", "rubric": "Kind?",
                                                                          "severity": "warn", "blocking": True}])
    assert "schema:" in spec.to_yaml() and "schema_" not in spec.to_yaml()
    assert parse_workflow(__import__("yaml").safe_load(spec.to_yaml())) == spec


# --- Dagster asset checks over the task assets -----------------------------------------------------------------

def _task_assets(spec: WorkflowSpec, value: Any) -> list[dg.AssetsDefinition]:
    """Stand-ins for the workflow's task assets: `draft` stores `value`, `final` depends on it."""

    @dg.asset(key=asset_key(spec, "draft"))
    def draft() -> Any:
        return value

    @dg.asset(key=asset_key(spec, "final"), deps=[asset_key(spec, "draft")])
    def final() -> str:
        return "done"

    return [draft, final]


def _materialize(spec: WorkflowSpec, value: Any, instance: dg.DagsterInstance, **budget: Any) -> dg.ExecuteInProcessResult:
    return dg.materialize([*_task_assets(spec, value), *build_asset_checks(spec)], instance=instance,
                          resources={"llm": build_llm_resource(), "budget": RunBudget(**budget)}, raise_on_error=False)


def _materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def test_a_failed_blocking_error_check_stops_the_downstream_task_and_names_the_items(instance: dg.DagsterInstance) -> None:
    spec = _spec([{"type": "max_chars", "value": 5, "blocking": True}, {"type": "non_empty", "severity": "warn"}],
                 fan_out=True)
    result = _materialize(spec, ["short", "far too long", "tiny"], instance)
    assert not result.success and _materialized(result) == {"draft"}
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations["max_chars"].passed and evaluations["max_chars"].severity == dg.AssetCheckSeverity.ERROR
    assert evaluations["max_chars"].metadata["failing_items"].value[0]["item"] == "draft[1]"
    assert evaluations["non_empty"].passed and evaluations["non_empty"].severity == dg.AssetCheckSeverity.WARN
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == checks_step("checked", "draft")
    assert "draft[1]: 12 characters, more than 5" in failure.step_failure_data.user_failure_data.description
    states = step_states(instance, result.run_id)
    tasks: dict[str, dict[str, Any]] = {"draft": {"status": "success"}, "final": {"status": "not_run"}}
    attach_checks(tasks, check_evaluations(instance, result.run_id, spec), spec, states)
    assert [(c["name"], c["passed"], c["severity"]) for c in tasks["draft"]["checks"]] == [
        ("max_chars", False, "error"), ("non_empty", True, "warn")]
    assert "draft[1]" in tasks["draft"]["checks_error"]
    assert failed_check_lines(tasks["draft"]) == [
        "      check max_chars failed (error): 2 of 3 answers pass (67%, needs 100%); failing: draft[1]: 12 "
        "characters, more than 5"]


def test_failed_warn_and_non_blocking_checks_do_not_stop_the_run(instance: dg.DagsterInstance) -> None:
    spec = _spec([{"type": "max_chars", "value": 5, "severity": "warn", "blocking": True},
                  {"type": "matches", "pattern": "^x"}])
    result = _materialize(spec, "far too long", instance)
    assert result.success and _materialized(result) == {"draft", "final"}
    assert sorted((e.check_name, e.passed) for e in result.get_asset_check_evaluations()) == [
        ("matches", False), ("max_chars", False)]


def test_judge_scores_through_the_call_path_with_its_usage_apart_and_counted_in_the_budget(
        instance: dg.DagsterInstance) -> None:
    spec = _spec([{"type": "judge", "rubric": "Is the answer polite?", "min_score": 1}], fan_out=True)
    answers = ["Thank you kindly.", "Go away.", "Please hold."]
    result = _materialize(spec, answers, instance)
    (evaluation,) = result.get_asset_check_evaluations()
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert evaluation.passed and meta["calls"] == 3 and meta["prompt_tokens"] > 0 and meta["cost_usd"] > 0
    assert all(1 <= s <= 5 for s in meta["scores"]) and meta["mean_score"] == pytest.approx(sum(meta["scores"]) / 3,
                                                                                          abs=1e-3)
    again = _materialize(spec, answers, instance)  # the simulated judge is deterministic; the answers are cached
    meta2 = {k: v.value for k, v in again.get_asset_check_evaluations()[0].metadata.items()}
    assert meta2["scores"] == meta["scores"] and meta2["calls"] == 0 and meta2["cache_hits"] == 3
    # A threshold above the lowest score fails the items scored below it, by name.
    low = min(range(3), key=lambda i: meta["scores"][i])
    strict = _spec([{"type": "judge", "rubric": "Is the answer polite?", "min_score": meta["scores"][low] + 0.5}],
                   fan_out=True)
    (failed,) = _materialize(strict, answers, instance).get_asset_check_evaluations()
    assert not failed.passed and f"draft[{low}]" in failed.description
    # The judge's calls are the run's: a budget of 2 calls stops the third (a fresh rubric: no cache hits).
    tight = _spec([{"type": "judge", "rubric": "Is it short?"}], fan_out=True)
    stopped = _materialize(tight, answers, instance, max_calls=2)
    failure = next(e for e in stopped.all_events if e.is_step_failure)
    assert failure.step_key == checks_step("checked", "draft")
    assert "budget" in failure.step_failure_data.user_failure_data.description
    assert _materialized(stopped) == {"draft", "final"}  # a non-blocking check: downstream ran


def test_judge_over_a_real_openai_client_reads_json_and_text_scores(openai_env: Any,
                                                                   instance: dg.DagsterInstance) -> None:
    openai_env.faults.add_for("Thank you kindly.", content='{"score": 5, "reason": "polite"}')
    openai_env.faults.add_for("Go away.", content="Score: 2 (rude)", times=2)  # not JSON, nor after the repair
    spec = _spec([{"type": "judge", "rubric": "Is the answer polite?"}], fan_out=True)
    result = _materialize(spec, ["Thank you kindly.", "Go away."], instance)
    (evaluation,) = result.get_asset_check_evaluations()
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta["scores"] == [5.0, 2.0] and meta["mean_score"] == 3.5 and meta["min_score"] == 3.0
    assert not evaluation.passed and "draft[1]: score 2 below 3" in evaluation.description
    assert meta["calls"] == 3  # two answers and one repair request, all paid for
    assert len(openai_env.requests) == 3
    first = openai_env.requests[0].body
    assert first["temperature"] == 0 and first["response_format"]["type"] == "json_schema"
    assert first["messages"][0]["role"] == "system" and "Rubric:\nIs the answer polite?" in first["messages"][1]["content"]
    assert _materialized(result) == {"draft", "final"}  # not blocking


# --- whole workflow runs (the job over the task assets, checks included) ----------------------------------------

RUN_SPEC = """
name: checked_run
inputs:
  notes: {type: list, default: ["first note", "second note"]}
tasks:
  - name: summary
    for_each: inputs.notes
    prompt: "Summarise: {{ item }}"
    checks: CHECKS
  - name: final
    prompt: "Digest of {{ summary }}"
"""


def _run(tmp_path: Path, instance: dg.DagsterInstance, checks: str, **budget: Any) -> dict[str, Any]:
    from mp_pipelines.cli.api import run_workflow

    path = tmp_path / "checked_run.yaml"
    path.write_text(RUN_SPEC.replace("CHECKS", checks))
    return run_workflow(path, instance=instance, **budget)


def test_a_run_whose_blocking_check_fails_does_not_run_the_downstream_task(tmp_path: Path,
                                                                          instance: dg.DagsterInstance) -> None:
    payload = _run(tmp_path, instance, "[{type: max_chars, value: 10, blocking: true}, {type: non_empty}]")
    assert payload["status"] == "failure"
    summary, final = payload["tasks"]["summary"], payload["tasks"]["final"]
    assert summary["status"] == "success" and final["status"] in ("not_run", "skipped")
    assert [(c["name"], c["passed"], c["severity"]) for c in summary["checks"]] == [
        ("max_chars", False, "error"), ("non_empty", True, "error")]
    failing = summary["checks"][0]["metadata"]["failing_items"]
    assert [f["item"] for f in failing] == ["summary[0]", "summary[1]"]
    assert "summary[0]" in summary["checks_error"] and "max_chars" in summary["checks_error"]
    assert payload["checks_usage"]["calls"] == 0 and payload["usage"]["calls"] == 2


def test_a_failed_warn_check_is_reported_and_the_run_goes_on(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    payload = _run(tmp_path, instance, "[{type: max_chars, value: 10, severity: warn, blocking: true}]")
    assert payload["status"] == "success" and payload["tasks"]["final"]["status"] == "success"
    (check,) = payload["tasks"]["summary"]["checks"]
    assert check["passed"] is False and check["severity"] == "warn"
    assert "checks" not in payload["tasks"]["final"]


def test_a_judge_in_a_run_is_counted_apart_and_in_the_run_budget(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    judge = '[{type: judge, rubric: "Is it a faithful summary?", min_score: 1, blocking: true}]'
    payload = _run(tmp_path, instance, judge, max_calls=10)
    assert payload["status"] == "success"
    (check,) = payload["tasks"]["summary"]["checks"]
    assert check["passed"] and check["metadata"]["calls"] == 2 and len(check["metadata"]["scores"]) == 2
    assert payload["checks_usage"]["calls"] == 2 and payload["usage"]["calls"] == 3  # the tasks' own: 2 + 1
    assert _stats_calls(instance) == 5  # `stats` counts the judge's calls too
    # 3 calls: both summaries, then one judge call; the second is refused, so `final` (behind the check) waits.
    stopped = _run(tmp_path, instance, judge.replace("faithful", "short"), max_calls=3)
    assert stopped["status"] == "failure" and stopped["tasks"]["final"]["status"] in ("not_run", "skipped")
    assert "budget" in stopped["tasks"]["summary"]["checks_error"]
    # the judge calls answered before the refusal are in the run's summary as in `stats`
    assert _stats_calls(instance) - 5 == stopped["usage"]["calls"] + stopped["checks_usage"]["calls"] > 0


def _stats_calls(instance: dg.DagsterInstance) -> int:
    from mp_pipelines.cli.usage_stats import usage_rows

    return sum(row["calls"] for row in usage_rows(instance, since=None, by="workflow"))


def test_run_command_prints_failed_checks_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checked_run.yaml").write_text(RUN_SPEC.replace("CHECKS", "[{type: matches, pattern: '^ok$', "
                                                                          "severity: warn}]"))
    text = CliRunner().invoke(main, ["run", "checked_run.yaml"])
    assert text.exit_code == 0, text.output
    assert "check matches failed (warn): 0 of 2 answers pass" in text.output and "summary[0]" in text.output
    result = CliRunner().invoke(main, ["run", "checked_run.yaml", "--json"])
    payload = json.loads(result.stdout)
    (check,) = payload["tasks"]["summary"]["checks"]
    assert set(check) >= {"name", "passed", "severity", "metadata"} and check["metadata"]["pattern"] == "^ok$"


def test_a_run_stopped_by_a_blocking_check_exits_1_with_a_summary_naming_the_check_and_items(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checked_run.yaml").write_text(RUN_SPEC.replace("CHECKS", "[{type: max_chars, value: 10, "
                                                                          "blocking: true}]"))
    result = CliRunner().invoke(main, ["run", "checked_run.yaml"])
    assert result.exit_code == 1, result.output
    assert "check max_chars failed (error)" in result.stdout
    assert "final                not_run" in result.stdout
    assert "failed at the quality checks of task summary: blocking check(s) failed" in result.stderr
    assert "summary[0]" in result.stderr and "Traceback" not in result.output


def test_show_lists_a_task_s_checks_and_which_block() -> None:
    from mp_pipelines.cli.show import render_workflow

    spec = _spec([{"type": "non_empty", "blocking": True}, {"type": "matches", "pattern": "x", "blocking": True,
                                                             "severity": "warn"}])
    line = next(line for line in render_workflow(spec).splitlines() if line.startswith("  draft:"))
    assert "checks non_empty (blocking), matches" in line and "matches (blocking)" not in line


def test_items_left_out_by_on_item_failure_skip_keep_their_input_index(openai_env: Any, tmp_path: Path,
                                                                      instance: dg.DagsterInstance) -> None:
    from mp_pipelines.cli.api import run_workflow

    openai_env.faults.add_for("note two", status=400, times=5)  # refused: the item fails, not retried
    path = tmp_path / "skipping.yaml"
    path.write_text(RUN_SPEC.replace('["first note", "second note"]', '["note one", "note two", "note three"]')
                    .replace("    checks: CHECKS", "    on_item_failure: skip\n    checks: [{type: max_chars, value: 10, "
                                                   "severity: warn}]"))
    payload = run_workflow(path, instance=instance)
    assert payload["status"] == "success", payload
    (check,) = payload["tasks"]["summary"]["checks"]
    assert check["metadata"]["answers"] == 2
    assert [f["item"] for f in check["metadata"]["failing_items"]] == ["summary[0]", "summary[2]"]


def test_a_fan_out_over_a_table_checks_each_row_s_answer(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    from mp_pipelines.cli.api import run_workflow

    (tmp_path / "tickets.csv").write_text("id,text\n1,The app crashes\n2,Refund please\n")
    path = tmp_path / "tabled.yaml"
    path.write_text("""
name: tabled
inputs:
  tickets: {type: table}
tasks:
  - name: classify
    for_each: inputs.tickets
    prompt: "Classify: {{ item.text }}"
    output: json
    output_schema: {type: object, properties: {category: {type: string, enum: [bug, billing]}}, required: [category]}
    checks:
      - {type: json_schema}
      - {type: json_schema, schema: {type: object, required: [priority]}, severity: warn}
""")
    payload = run_workflow(path, {"tickets": str(tmp_path / "tickets.csv")}, instance=instance)
    assert payload["status"] == "success", payload
    own, other = payload["tasks"]["classify"]["checks"]
    assert own["passed"] and own["metadata"]["answers"] == 2  # each row's result columns, not the input columns
    assert not other["passed"] and [f["item"] for f in other["metadata"]["failing_items"]] == ["classify[0]",
                                                                                              "classify[1]"]
