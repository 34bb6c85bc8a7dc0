"""The `mp-pipelines` command line: list, validate, show, run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mp_pipelines.cli.main import main

BAD = """
name: broken
tasks:
  - name: plan
    prompt: "{{ inputs.topic }}"
    depend_on: [x]
  - name: write
    for_each: nowhere
    prompt: "{{ item }}"
"""


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # the CLI's local instance lives under the working folder
    return CliRunner()


def test_list_shows_shipped_workflows(runner: CliRunner) -> None:
    result = runner.invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("research_report") and "inputs: topic, max_questions, audience" in line for line in lines)
    assert any(line.startswith("classify_tickets") for line in lines)
    assert any(line.startswith("summarize_documents") for line in lines)


def test_list_warns_about_bad_files_on_the_workflows_path(runner: CliRunner, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "broken.yaml").write_text(BAD)
    (folder / "hello.yaml").write_text("name: hello\ntasks: [{name: greet, prompt: hi}]\n")
    monkeypatch.setenv("MP_WORKFLOWS_PATH", str(folder))
    result = runner.invoke(main, ["list"])
    assert result.exit_code == 0
    assert "hello" in result.stdout and "research_report" in result.stdout
    assert "broken.yaml" in result.stderr


def test_validate_good_files(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate"])
    assert result.exit_code == 0, result.output
    assert "3 workflow(s) valid, 0 problem(s)" in result.stdout


def test_validate_bad_file_lists_every_problem_and_fails(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(BAD)
    result = runner.invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert str(bad) in result.stdout
    assert "depend_on" in result.stdout and "did you mean 'depends_on'" in result.stdout
    assert "0 workflow(s) valid" in result.stdout


def test_validate_reports_semantic_problems_with_paths(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad_refs.yaml"
    bad.write_text(BAD.replace("    depend_on: [x]\n", ""))
    result = runner.invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "tasks[1] (write).for_each" in result.stdout and "nowhere" in result.stdout
    assert "tasks[0] (plan).prompt" in result.stdout and "topic" in result.stdout


def test_show_prints_the_dag(runner: CliRunner) -> None:
    result = runner.invoke(main, ["show", "research_report"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "topic: string, required" in text
    assert "research: text" in text and "for_each plan" in text and "← inputs, plan" in text
    assert "refine: loop, ≤3 iterations until critique.done" in text
    order = [text.index(f"\n  {name}:") for name in ("plan", "research", "draft", "refine", "report")]
    assert order == sorted(order)


def test_show_unknown_workflow(runner: CliRunner) -> None:
    result = runner.invoke(main, ["show", "nope"])
    assert result.exit_code != 0
    assert "no workflow named 'nope'" in result.output and "research_report" in result.output


def test_run_json(runner: CliRunner, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"topic": "coral reefs", "max_questions": 2}))
    result = runner.invoke(main, ["run", "research_report", "--input-file", str(inputs), "--input", "max_questions=3",
                                  "--json", "--executor", "in_process"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["status"] == "success" and payload["provider"] == "simulated"
    assert len(payload["tasks"]["plan"]["output"]) == 3  # --input wins over --input-file
    assert len(payload["tasks"]["research"]["output"]) == 3
    assert payload["tasks"]["report"]["status"] == "success"
    assert payload["usage"]["calls"] >= 7 and payload["usage"]["prompt_tokens"] > 0
    assert (tmp_path / ".mp_pipelines" / "dagster_home").is_dir()  # persistent local instance
    assert "research[0]" in result.stderr  # progress goes to stderr


def test_run_text_prints_statuses_and_final_output(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "classify_tickets", "--executor", "in_process"])
    assert result.exit_code == 0, result.output
    assert "classify             success  12 call(s)" in result.stdout
    assert "usage: " in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--input", "topik=x"], "unknown input(s) topik"),
    (["--input", "max_questions=many"], "expects an integer"),
    ([], "input 'topic' of research_report is required"),
    (["--input", "novalue"], "is not key=value"),
])
def test_run_rejects_bad_inputs_before_running(runner: CliRunner, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(main, ["run", "research_report", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / ".mp_pipelines").exists()  # nothing ran


def test_run_failure_exits_non_zero_with_the_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["run", "classify_tickets", "--input", f"tickets={tmp_path / 'missing.csv'}",
                                  "--json", "--executor", "in_process"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["status"] == "failure"
    assert "missing.csv" in payload["tasks"]["classify"]["error"]


def test_run_a_workflow_file_by_path(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "hello.yaml"
    path.write_text("name: hello\ninputs: {who: {type: string}}\ntasks: [{name: greet, prompt: 'Hi {{ inputs.who }}'}]\n")
    result = runner.invoke(main, ["run", str(path), "-i", "who=Grace", "--json", "--executor", "in_process"])
    assert result.exit_code == 0, result.output
    assert "Hi Grace" in json.loads(result.stdout)["tasks"]["greet"]["output"]


def test_readme_command_runs_with_the_jobs_own_executor(tmp_path: Path) -> None:
    """The README's command, as a user types it: the console script and the job's own (concurrent) executor."""
    exe = shutil.which("mp-pipelines") or f"{sys.executable} -m mp_pipelines.cli"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    completed = subprocess.run([*exe.split(), "run", "research_report", "--input", "topic=wind turbines",
                                "--input", "max_questions=2", "--json"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload = json.loads(completed.stdout)
    assert payload["status"] == "success"
    assert len(payload["tasks"]["research"]["output"]) == 2
    assert "STEP_WORKER_STARTED" not in completed.stderr  # Dagster's engine chatter stays out of the progress


# Invokes one command in a fresh interpreter and prints which heavy libraries it loaded, and from where.
_IMPORT_PROBE = """
import sys, traceback
HEAVY = ("dagster", "openai", "pandas")
first = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in HEAVY and top not in first:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "mp_pipelines" in f.filename]
            first[top] = frames[-1] if frames else "?"
        return None
sys.meta_path.insert(0, Spy())
from mp_pipelines.cli.main import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print({top: first.get(top, "?") for top in HEAVY if top in sys.modules})
"""


@pytest.mark.parametrize("command", [["list"], ["validate"], ["show", "research_report"]])
def test_quick_commands_import_neither_dagster_nor_openai_nor_pandas(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MP_WORKFLOWS_PATH", "DAGSTER_HOME")}
    completed = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *command], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "{}", completed.stdout  # heavy library → where it came in


def test_input_errors_name_the_option(runner: CliRunner, tmp_path: Path) -> None:
    not_an_object = tmp_path / "list.json"
    not_an_object.write_text("[1, 2]")
    broken = tmp_path / "broken.json"
    broken.write_text("{topic")
    for args, message in ((["--input-file", str(not_an_object)], "must hold a JSON object of input name → value"),
                          (["--input-file", str(broken)], f"cannot read {broken}")):
        result = runner.invoke(main, ["run", "research_report", *args])
        assert result.exit_code == 2 and message in result.output and "--input-file" in result.output
    result = runner.invoke(main, ["run", "research_report", "-i", "topic=x", "--executor", "threads"])
    assert result.exit_code == 2 and "'threads' is not one of 'concurrent', 'multiprocess', 'in_process'" in result.output
    assert not (tmp_path / ".mp_pipelines").exists()  # nothing ran


def test_key_value_pairs_and_untyped_inputs() -> None:
    import click

    from mp_pipelines.cli.args import parse_pairs, parse_untyped_inputs

    assert parse_pairs(["a=1", " b =x=y", "a=2", "c="], "--tag") == {"a": "2", "b": "x=y", "c": ""}
    for bad in ("novalue", "=x", " =x"):
        with pytest.raises(click.BadParameter, match="is not key=value") as caught:
            parse_pairs([bad], "--tag")
        assert caught.value.param_hint == "--tag"
    assert parse_untyped_inputs(["n=3", "flag=true", "text=hello world", "empty=", "list=[1, 2]"], None) == {
        "n": 3, "flag": True, "text": "hello world", "empty": "", "list": [1, 2]}


def test_run_config_for_local_and_remote_runs() -> None:
    from mp_pipelines.cli.config import run_config, with_budget
    from mp_pipelines.factory.names import BUDGET_RESOURCE_KEY, EXECUTORS, INPUTS_OP

    local = run_config({"topic": "x"}, "multiprocess", {"max_calls": 5, "max_tokens": None})
    assert local == {"ops": {INPUTS_OP: {"config": {"topic": "x"}}},
                     "loggers": {"console": {"config": {"log_level": "WARNING"}}},
                     "execution": {"config": {"multiprocess": {}}},
                     "resources": {BUDGET_RESOURCE_KEY: {"config": {"max_calls": 5, "from_flags": ["max_calls"]}}}}
    assert run_config({}, None, console_log_level=None) == {"ops": {INPUTS_OP: {"config": {}}}}
    for executor in EXECUTORS:
        assert run_config({}, executor)["execution"] == {"config": {executor: {}}}
    with pytest.raises(ValueError, match="unknown executor 'threads'"):
        run_config({}, "threads")
    merged = with_budget({"resources": {BUDGET_RESOURCE_KEY: {"config": {"max_calls": 5, "max_cost_usd": 1.0}}}},
                         {"max_calls": 2, "max_tokens": None})
    assert merged["resources"][BUDGET_RESOURCE_KEY]["config"] == {"max_calls": 2, "max_cost_usd": 1.0,
                                                                  "from_flags": ["max_calls"]}


def test_a_bad_setting_in_the_environment_is_bad_usage_not_a_traceback(runner: CliRunner,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_SIMULATED_LATENCY", "abc")
    result = runner.invoke(main, ["run", "research_report", "--input", "topic=x"])
    assert result.exit_code == 2, result.output
    assert "MP_SIMULATED_LATENCY='abc' is not valid" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("variable", "value", "workflow", "said"), [
    ("MP_MAX_INPUT_CHARS", "1x", "classify_tickets", "MP_MAX_INPUT_CHARS='1x' is not a whole number"),
    ("MP_MAX_PROMPT_CHARS", "abc", "research_report", "MP_MAX_PROMPT_CHARS='abc' is not a whole number"),
    ("MP_MAX_TABLE_ROWS", "0", "classify_tickets", "MP_MAX_TABLE_ROWS='0' is less than 1"),
    ("MP_PRICES_FILE", "{missing}", "research_report", "is not a usable price file: cannot read the price file"),
    ("MP_PRICES_FILE", "{malformed}", "research_report", "is not a usable price file: the price file is not valid YAML on line"),
    ("MP_RETRY_BASE_DELAY", "99", "research_report", "MP_RETRY_BASE_DELAY='99' is not valid"),
    ("MP_BATCH_POLL_SECONDS", "soon", "research_report", "MP_BATCH_POLL_SECONDS='soon' is not valid"),
    ("MP_FLEET_LIMITS", "maybe", "research_report", "MP_FLEET_LIMITS='maybe' is not valid"),
    ("MP_LOG_FORMAT", "xml", "research_report", "MP_LOG_FORMAT='xml' is not valid"),
])
def test_a_bad_mp_setting_refuses_the_run_naming_it(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    variable: str, value: str, workflow: str, said: str) -> None:
    malformed = tmp_path / "prices.yaml"
    malformed.write_text("gpt-4o-mini: {input: [oops\n")
    value = value.format(missing=tmp_path / "no-such-prices.yaml", malformed=malformed)
    monkeypatch.setenv(variable, value)
    args = ["run", workflow] + (["--input", "topic=x"] if workflow == "research_report" else [])
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    assert variable in result.output and said in result.output, result.output
    assert "Traceback" not in result.output and "template" not in result.output and "started" not in result.output
    if variable == "MP_PRICES_FILE":
        assert "unset it for the shipped prices" in " ".join(result.output.split())


@pytest.mark.parametrize(("variable", "value", "workflow", "inputs"), [
    ("MP_MAX_PROMPT_CHARS", "abc", "research_report", {"topic": "x"}),
    ("MP_MAX_PROMPT_CHARS", "abc", "classify_tickets", {}),  # a fan-out's items, rendered on the call loop
    ("MP_PRICES_FILE", "/no/such/prices.yaml", "research_report", {"topic": "x"}),
    ("MP_MAX_INPUT_CHARS", "1x", "research_report", {"topic": "x"}),
])
def test_a_bad_mp_setting_inside_a_step_names_the_setting(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                                         variable: str, value: str, workflow: str,
                                                         inputs: dict[str, str]) -> None:
    """A run started without the CLI's check (the Dagster UI, a schedule) fails with the setting named, not the
    template or the input blamed."""
    from mp_pipelines.cli.main import resolve_workflow
    from mp_pipelines.cli.running import run_workflow

    spec, source = resolve_workflow(workflow)
    monkeypatch.setenv(variable, value)
    outcome = run_workflow(spec, inputs, source=source)
    summary = outcome.failure_summary()
    assert not outcome.success and f"{variable}={value!r}" in summary, summary
    assert "environment setting" in summary and "fix the task's template" not in summary
    assert "check the path given" not in summary and "before any task did" not in summary and "Error:" not in summary
    failed = [task for task in outcome.tasks.values() if task["status"] == "failed"]
    assert all(task["error"].startswith("task ") and "environment setting" in task["error"]
               for task in failed), failed  # the step's own error, not an exception's class name


def test_every_mp_setting_is_checked_before_a_run_or_exempt_with_a_reason() -> None:
    """A new MP_* variable read anywhere in the package must be added to cli/settings_check (CHECKS or EXEMPT)."""
    import re

    import mp_pipelines
    from mp_pipelines.cli.settings_check import CHECKS, EXEMPT

    package = Path(mp_pipelines.__file__).parent
    found = {name for file in package.rglob("*.py")
             for name in re.findall(r"\bMP_[A-Z][A-Z0-9_]*[A-Z0-9]\b", file.read_text(encoding="utf-8"))}
    assert found - set(CHECKS) - set(EXEMPT) == set(), "add these to CHECKS or EXEMPT in cli/settings_check.py"
    assert set(CHECKS) & set(EXEMPT) == set()
    assert all(reason.strip() for reason in EXEMPT.values())
    assert set(CHECKS) | set(EXEMPT) <= found, "CHECKS/EXEMPT name a variable the package no longer reads"


def test_a_secret_setting_is_never_checked_by_printing_it() -> None:
    from mp_pipelines.cli.settings_check import CHECKS

    secret = {"KEY", "TOKEN", "PASSWORD", "SECRET", "URL"}
    assert not [name for name in CHECKS if secret & set(name.split("_"))]


def test_the_failure_summary_names_a_bad_setting_not_the_template_or_the_input() -> None:
    from mp_pipelines.cli.summary import failure_summary

    raw = "mp_pipelines.spec.size_limits.SettingError: MP_MAX_PROMPT_CHARS='x' is not a whole number; set …"
    summary = failure_summary("r1", {"fan": {"status": "failed", "error": raw}}, ["fan"])
    assert "environment setting: MP_MAX_PROMPT_CHARS='x'" in summary and "SettingError" not in summary
    assert "fix or unset the environment variable" in summary and "template" not in summary
    inputs_step = "step wf__inputs: workflow 'wf': environment setting: MP_MAX_INPUT_CHARS='1x' is not a whole number"
    summary = failure_summary("r1", {"fan": {"status": "not_run"}}, ["fan"], [inputs_step])
    assert "before any task ran, at step wf__inputs" in summary and "MP_MAX_INPUT_CHARS='1x'" in summary
    assert "check the path given" not in summary
