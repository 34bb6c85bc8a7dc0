"""What a new user meets in the first hour: exit codes, input errors, failure summaries without stack traces, budget
errors that say where the limit was set, `mp_pipelines.run_workflow`, the builder's methods, and simulated answers
that differ per item. Runs use the real console script and Dagster with the simulated model (offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import mp_pipelines
from mp_pipelines.cli.main import main
from mp_pipelines.cli.summary import failure_summary
from mp_pipelines.llm.simulated import SimulatedModel
from mp_pipelines.spec.builder import WorkflowBuilder

FAN = """\
name: fan
inputs:
  words: {type: list, default: ["alpha", "bravo", "charlie", "delta"]}
defaults: {temperature: 0}
tasks:
  - name: label
    for_each: inputs.words
    prompt: "Label the word {{ item }} as JSON."
    output: json
    output_schema:
      type: object
      properties: {word: {type: string}, size: {type: integer, minimum: 1, maximum: 9}}
      required: [word, size]
  - name: join
    prompt: "{% for l in label %}{{ l.word }} {% endfor %}"
"""


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # the CLI's local instance lives under the working folder
    return CliRunner()


def cli() -> list[str]:
    exe = shutil.which("mp-pipelines")
    return [exe] if exe else [sys.executable, "-m", "mp_pipelines.cli"]


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return subprocess.run([*cli(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_documents_the_exit_codes(runner: CliRunner) -> None:
    for args in ([], ["run"]):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert "Exit codes: 0 success; 1 a run failed" in text and "2 bad usage or input" in text


@pytest.mark.parametrize("args, words", [
    (["run", "research_reprt"], ["no workflow named 'research_reprt'", "did you mean 'research_report'?"]),
    (["run", "research_report", "--input", "topc=tides"],
     ["unknown input(s) topc", "topic (string)", "did you mean 'topic'?"]),
    (["run", "research_report", "-i", "topic=x", "-i", "max_questions=abc"],
     ["input 'max_questions' expects an integer: 'abc' is not a whole number"]),
    (["run", "research_report", "-i", "topic=x", "-i", "max_questions=2.5"],
     ["input 'max_questions' expects an integer", "2.5"]),
    (["run", "nowhere.yaml"], ["nowhere.yaml", "does not exist"]),
])
def test_bad_usage_and_input_exit_2_naming_what_is_wrong(runner: CliRunner, tmp_path: Path, args: list[str],
                                                        words: list[str]) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for word in words:
        assert word in text
    assert "Traceback" not in result.output
    assert not (tmp_path / ".mp_pipelines").exists()  # nothing ran


def test_resuming_a_run_that_does_not_exist_is_bad_usage(runner: CliRunner) -> None:
    result = runner.invoke(main, ["resume", "0000-no-such-run"])
    assert result.exit_code == 2 and "no run '0000-no-such-run' in the Dagster instance at" in result.output
    assert "Traceback" not in result.output


def test_an_input_file_that_is_not_json_exits_2_with_line_and_column(runner: CliRunner, tmp_path: Path) -> None:
    broken = tmp_path / "inputs.json"
    broken.write_text('{"topic": tides}')
    result = runner.invoke(main, ["run", "research_report", "--input-file", str(broken)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert f"cannot read {broken}: it is not JSON (line 1, column 11: expecting value)" in text
    assert "Expecting value" not in text


def test_a_failed_run_prints_one_paragraph_and_no_stack_trace(tmp_path: Path) -> None:
    completed = run_cli(["run", "research_report", "-i", "topic=tides", "-i", "max_questions=4", "--max-calls", "2"],
                        tmp_path)
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr and "Stack Trace" not in completed.stderr
    assert " - ERROR - " not in completed.stderr  # Dagster's own error log stays in the UI and with --verbose
    summary = completed.stderr.strip().splitlines()[-1]
    assert summary.startswith("Run ") and "failed at task research, item research[" in summary
    assert "max_calls of 2 reached" in summary
    assert "max_calls was set by --max-calls; pass a larger --max-calls" in summary  # where the limit came from
    assert "mp-pipelines resume " in summary and "--verbose" in summary

    verbose = run_cli(["run", "research_report", "-i", "topic=tides", "-i", "max_questions=4", "--max-calls", "2",
                       "--verbose"], tmp_path)
    assert verbose.returncode == 1
    assert "Stack Trace" in verbose.stderr or "Traceback" in verbose.stderr


def test_the_budget_error_names_the_workflows_budget_and_the_run_config(tmp_path: Path) -> None:
    spec = yaml.safe_load(FAN)
    spec["budget"] = {"max_calls": 1}
    spec_path = tmp_path / "fan.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = mp_pipelines.run_workflow(spec_path, executor="in_process")
    error = result["tasks"]["label"]["error"]
    assert result["status"] == "failure" and "max_calls of 1 reached" in error
    assert "max_calls was set in the workflow's budget:; raise it there, or for one run with --max-calls" in error

    from mp_pipelines.factory.resources import RunBudget
    from mp_pipelines.spec.models import BudgetSpec, WorkflowSpec

    parsed = WorkflowSpec.model_validate(spec)
    assert "run config's resources.budget.config.max_calls" in RunBudget(max_calls=3).over(parsed).raise_hint(
        "max_calls")
    assert "set by --max-tokens" in RunBudget(max_tokens=9, from_flags=["max_tokens"]).over(parsed).raise_hint(
        "max_tokens")
    assert "workflow's budget:" in BudgetSpec(max_calls=2).raise_hint("max_calls")


def test_failure_summary_names_task_item_reason_and_what_to_do() -> None:
    tasks: dict[str, Any] = {
        "plan": {"status": "success"},
        "research": {"status": "failed", "error": "task research: item failed: HTTP 401 invalid api key",
                     "failed_items": [{"index": 3, "item": "What is a tide?", "error": "401"}]},
        "draft": {"status": "not_run"},
    }
    text = failure_summary("r1", tasks, ["plan", "research", "draft"])
    assert "\n" not in text
    assert text.startswith("Run r1 failed at task research, item research[3] ('What is a tide?'): item failed: HTTP 401")
    assert "check OPENAI_API_KEY" in text and "mp-pipelines resume r1" in text


def test_run_workflow_returns_what_run_json_prints(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "fan.yaml"
    path.write_text(FAN)
    from_python = mp_pipelines.run_workflow(str(path), {"words": ["kilo", "lima"]}, executor="in_process")
    result = runner.invoke(main, ["run", str(path), "--input", "words=kilo,lima", "--json", "--executor", "in_process"])
    assert result.exit_code == 0, result.output
    from_cli = json.loads(result.stdout)
    assert set(from_python) == set(from_cli) == {"run_id", "status", "provider", "tasks", "usage"}
    assert from_python["status"] == from_cli["status"] == "success"
    assert from_python["tasks"]["label"]["output"] == from_cli["tasks"]["label"]["output"]  # deterministic answers
    assert set(from_python["usage"]) == set(from_cli["usage"])
    with pytest.raises(ValueError, match="input 'words' expects a list"):
        mp_pipelines.run_workflow(str(path), {"words": {"not": "a list"}})
    with pytest.raises(ValueError, match="did you mean 'words'"):
        mp_pipelines.run_workflow(str(path), {"word": ["x"]})
    with pytest.raises(LookupError, match="did you mean 'research_report'"):
        mp_pipelines.run_workflow("research_reprt")


def test_a_json_fan_out_gets_a_different_answer_per_item_offline(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    spec = (WorkflowBuilder("fan").input("words", "list", default=["alpha", "bravo", "charlie", "delta"])
            .defaults(temperature=0)
            .task("label", "Label the word {{ item }} as JSON.", for_each="inputs.words", output="json",
                  output_schema={"type": "object", "required": ["word", "size"],
                                 "properties": {"word": {"type": "string"}, "size": {"type": "integer"}}})
            .build())
    result = mp_pipelines.run_workflow(spec, executor="in_process")
    answers = result["tasks"]["label"]["output"]
    assert [word in answer["word"] for word, answer in zip(["alpha", "bravo", "charlie", "delta"], answers)] == \
        [True] * 4
    assert len({json.dumps(answer, sort_keys=True) for answer in answers}) == 4
    assert (tmp_path / ".mp_pipelines" / "dagster_home" / "specs").is_dir()  # where a built spec's runs reload it


@pytest.mark.parametrize("fmt", ["text", "json_schema"])
def test_simulated_answers_keep_the_item_from_the_middle_of_a_prompt(fmt: str) -> None:
    model = SimulatedModel()
    schema = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    answers = []
    for subject in ("Refund not received", "App crashes on login"):
        prompt = (f"Classify this support ticket.\nSubject: {subject}\nBody: it happened again today.\n"
                  "Answer as JSON with `category` (billing, bug, feature_request, account or other), `urgency` (low, "
                  "medium or high) and a one-line `summary`.")
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
        if fmt == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        _, _, response = model.respond(body)
        content = response["choices"][0]["message"]["content"]
        text = json.loads(content)["summary"] if fmt == "json_schema" else content
        assert subject in text
        assert model.respond(body)[2]["choices"][0]["message"]["content"] == content  # deterministic
        answers.append(text)
    assert answers[0] != answers[1]


def test_builder_limits_mean_what_yaml_limits_mean() -> None:
    spec = (WorkflowBuilder("w").breadth(5).depth(2).max_items(50)
            .limits(max_in_flight=4, requests_per_minute=100).budget(max_calls=7)
            .task("a", "hello").build())
    assert (spec.breadth, spec.depth, spec.max_items) == (5, 2, 50)
    assert spec.limits is not None and spec.limits.max_in_flight == 4 and spec.limits.requests_per_minute == 100
    assert spec.budget is not None and spec.budget.max_calls == 7
    assert yaml.safe_load(spec.to_yaml())["limits"] == {"max_in_flight": 4, "requests_per_minute": 100.0}
    with pytest.raises(TypeError):
        WorkflowBuilder("w").limits(breadth=3)  # type: ignore[call-arg]


def test_importing_mp_pipelines_stays_light() -> None:
    completed = subprocess.run([sys.executable, "-c", "import sys, mp_pipelines; "
                                "print(sorted(m for m in ('dagster', 'openai', 'pandas') if m in sys.modules))"],
                               capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip() == "[]", completed.stderr
