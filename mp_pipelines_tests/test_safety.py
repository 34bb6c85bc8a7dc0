"""Safety: size limits with clear errors, inputs that stay data, sandboxed templates, safe YAML, no leaked API key,
and bad input files that are reported, never deleted."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner
from dagster._serdes import serialize_value  # dagster 1.13.27: the form events and runs are stored in

from mp_pipelines.cli.main import main
from mp_pipelines.cli.running import local_instance
from mp_pipelines.sensors.inbox import scan_inbox, table_checker
from mp_pipelines.spec.inputs import coerce_input, load_table
from mp_pipelines.spec.loader import WorkflowValidationError, load_workflow_file, load_workflows, parse_workflow
from mp_pipelines.spec.size_limits import MAX_INPUT_CHARS, MAX_PROMPT_CHARS, MAX_SPEC_BYTES, MAX_TABLE_BYTES, SizeLimitError
from mp_pipelines.spec.templates import TemplateError, evaluate, render
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import materializations, run_file, write_workflow

SECRET = "sk-test-SECRET-canary-1234567890"
ECHO = """
name: echo
inputs:
  text: {type: string}
tasks:
  - name: answer
    prompt: "Echo: {{ inputs.text }}"
"""
FAN_OUT = """
name: leak_check
inputs:
  names: {type: list, default: [Ada, Grace, Linus]}
tasks:
  - name: greet
    for_each: inputs.names
    shard_size: 2
    prompt: "Say hello to {{ item }}"
  - name: summary
    prompt: "Summarise: {% for g in greet %}{{ g }} {% endfor %}"
"""


def one_task(prompt: str, **task: Any) -> dict[str, Any]:
    """A workflow with one input, `topic`, and one task `a` with this prompt and task fields."""
    return {"name": "w", "inputs": {"topic": {"type": "string", "default": "x"}},
            "tasks": [{"name": "a", "prompt": prompt, **task}]}


def refused(data: dict[str, Any]) -> list[str]:
    """The problems of an invalid spec, as 'path: message' lines."""
    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(data, source="wf.yaml")
    return [f"{p.path}: {p.message}" for p in caught.value.problems]


# --- size limits -----------------------------------------------------------------------------------------------


def test_defaults_are_sane_when_no_variable_is_set() -> None:
    assert (MAX_INPUT_CHARS.value(), MAX_PROMPT_CHARS.value()) == (1_000_000, 400_000)
    assert (MAX_TABLE_BYTES.value(), MAX_SPEC_BYTES.value()) == (100_000_000, 1_000_000)
    coerce_input("string", "x" * 1_000_000, "topic")
    with pytest.raises(SizeLimitError, match="input 'topic' is 1,000,001 characters, more than the limit 1,000,000"):
        coerce_input("string", "x" * 1_000_001, "topic")


def test_a_long_input_names_the_input_its_size_the_limit_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_INPUT_CHARS", "10")  # read at use time: no reload needed
    with pytest.raises(SizeLimitError) as caught:
        coerce_input("string", "x" * 11, "topic")
    assert str(caught.value) == ("input 'topic' is 11 characters, more than the limit 10 (MP_MAX_INPUT_CHARS); "
                                 "set MP_MAX_INPUT_CHARS to allow more")
    with pytest.raises(SizeLimitError, match=r"input 'items' as JSON is 14 characters, more than the limit 10"):
        coerce_input("list", ["abc", "def"], "items")  # ["abc", "def"] is 14 characters of JSON
    with pytest.raises(SizeLimitError, match="input 'items' is 12 characters"):
        coerce_input("list", '["abcdefgh"]', "items")  # a JSON string is measured before it is parsed
    assert coerce_input("list", ["a", "b"], "items") == ["a", "b"]


def test_a_bad_limit_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_INPUT_CHARS", "lots")
    with pytest.raises(ValueError, match="MP_MAX_INPUT_CHARS='lots' is not a whole number; set a whole number of characters"):
        coerce_input("string", "x", "topic")
    monkeypatch.setenv("MP_MAX_INPUT_CHARS", "1_000")
    assert MAX_INPUT_CHARS.value() == 1000


# Tests that load workflows keep the limit above the shipped specs' defaults, which are checked against it too: the
# code location caches what it loaded, so a spec dropped here would stay dropped for later tests.
def test_the_cli_refuses_a_long_input_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MP_MAX_INPUT_CHARS", "100")
    path = write_workflow(tmp_path, ECHO)
    result = CliRunner().invoke(main, ["run", str(path), "--input", "text=" + "x" * 101])
    assert result.exit_code == 2
    assert "input 'text' is 101 characters, more than the limit 100 (MP_MAX_INPUT_CHARS)" in result.output
    assert not (tmp_path / ".mp_pipelines").exists()  # nothing ran


def test_the_inputs_op_refuses_a_long_input_and_calls_no_model(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_INPUT_CHARS", "100")
    outcome = run_file(write_workflow(tmp_path, ECHO), {"text": "x" * 101}, instance)
    assert not outcome.success
    failures = instance.get_records_for_run(outcome.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    (failure,) = [r.event_log_entry.dagster_event for r in failures]
    assert failure.step_key == "echo__inputs"  # the inputs op of workflow echo (factory/names.py)
    message = failure.step_failure_data.error.message
    assert "input 'text' is 101 characters, more than the limit 100 (MP_MAX_INPUT_CHARS)" in message
    assert not openai_env.requests


def test_a_large_table_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "big.csv"
    table.write_text("id,text\n" + "".join(f"{i},row {i}\n" for i in range(20)))
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "100")
    monkeypatch.setattr(pd, "read_csv", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(SizeLimitError) as caught:
        load_table(table, name="tickets")
    size = table.stat().st_size
    assert str(caught.value) == (f"input 'tickets': table file {str(table)!r} is {size:,} bytes, more than the limit 100 "
                                 "(MP_MAX_TABLE_BYTES); set MP_MAX_TABLE_BYTES to allow more")


def test_a_large_folder_of_text_files_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a.txt", "b.md"):
        (tmp_path / name).write_text("x" * 60)
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "100")
    with pytest.raises(SizeLimitError, match=r"the text files of folder .* together is 120 bytes, more than the limit 100"):
        load_table(tmp_path, name="documents")


def test_too_many_rows_name_the_limit_and_max_items(tmp_path: Path) -> None:
    table = tmp_path / "rows.csv"
    table.write_text("id\n1\n2\n3\n")
    with pytest.raises(SizeLimitError, match=r"has 3 rows, more than the limit 2 \(the workflow's max_items\)"):
        load_table(table, name="tickets", max_rows=2)


def test_a_long_rendered_prompt_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_PROMPT_CHARS", "50")
    assert render("{{ x }}", {"x": "a" * 50}) == "a" * 50
    with pytest.raises(TemplateError) as caught:
        render("{{ x }}!", {"x": "a" * 50})
    assert str(caught.value) == ("rendered prompt is 51 characters, more than the limit 50 (MP_MAX_PROMPT_CHARS); "
                                 "set MP_MAX_PROMPT_CHARS to allow more")


def test_a_task_whose_prompt_is_too_long_fails_without_calling_the_model(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_PROMPT_CHARS", "20")
    outcome = run_file(write_workflow(tmp_path, ECHO), {"text": "a long enough text"}, instance)
    assert not outcome.success
    error = outcome.tasks["answer"]["error"]
    assert "template error: rendered prompt is 24 characters, more than the limit 20 (MP_MAX_PROMPT_CHARS)" in error
    assert not openai_env.requests  # every prompt goes through render(), so nothing too long is ever sent


def test_a_large_spec_file_is_a_problem_and_the_others_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = write_workflow(tmp_path, "name: small\ntasks: [{name: a, prompt: p}]\n")
    big = write_workflow(tmp_path, "name: big\ndescription: " + "x" * 300 + "\ntasks: [{name: a, prompt: p}]\n")
    monkeypatch.setenv("MP_MAX_SPEC_BYTES", "200")
    loaded = load_workflows([tmp_path])
    assert list(loaded.specs) == ["small"] and loaded.sources["small"] == small
    (problem,) = loaded.problems
    assert problem.file == str(big) and problem.path == ""
    assert problem.message == (f"the workflow file is {big.stat().st_size} bytes, more than the limit 200 "
                               "(MP_MAX_SPEC_BYTES); set MP_MAX_SPEC_BYTES to allow more")


@pytest.mark.parametrize("text, message", [
    ("name: w\ntags: " + "[" * 5000 + "]" * 5000 + "\ntasks: [{name: a, prompt: p}]\n", "nested too deeply to read"),
    ("name: w\ntags: " + "[" * 70 + "]" * 70 + "\ntasks: [{name: a, prompt: p}]\n", "nested more than 64 levels deep"),
    ("name: w\ninputs: {x: {type: list, default: &loop [a, *loop]}}\ntasks: [{name: a, prompt: p}]\n",
     "a YAML alias (*name) refers to a mapping or list that contains it"),
    ("name: w\n" + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 10) + "]\n" for i in range(7))
     + "tasks: [{name: a, prompt: p}]\n", "more than 1,000,000 values once YAML aliases (*name) are expanded"),
])
def test_yaml_that_would_exhaust_the_loader_is_a_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(path)
    (problem,) = caught.value.problems
    assert problem.file == str(path) and message in problem.message


# --- inputs are data, templates are sandboxed, YAML is safe --------------------------------------------------------

TEMPLATE_TEXT = "{{ 7*7 }} {% for x in range(3) %}{{ x }}{% endfor %} {{ inputs.__class__ }} {# c #}"


def test_an_input_holding_template_text_reaches_the_model_verbatim(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    outcome = run_file(write_workflow(tmp_path, ECHO), {"text": TEMPLATE_TEXT}, instance)
    assert outcome.success, outcome.as_text()
    (request,) = openai_env.requests
    assert request.body["messages"] == [{"role": "user", "content": f"Echo: {TEMPLATE_TEXT}"}]


def test_items_and_model_answers_holding_template_text_stay_verbatim(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(content="{{ 6*7 }}", times=3)  # every greeting is template text
    items = [TEMPLATE_TEXT, "{% raw %}", "{{"]
    outcome = run_file(write_workflow(tmp_path, FAN_OUT), {"names": items}, instance)
    assert outcome.success, outcome.as_text()
    contents = [request.body["messages"][-1]["content"] for request in openai_env.requests]
    assert sorted(contents[:3]) == sorted(f"Say hello to {item}" for item in items)  # a shard's calls run concurrently
    assert contents[3] == "Summarise: {{ 6*7 }} {{ 6*7 }} {{ 6*7 }} "


@pytest.mark.parametrize("template", [
    "{{ inputs.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ inputs.topic|attr('__class__') }}",
    "{{ inputs['__class__'] }}",
    "{% for x in range.__self__ %}{% endfor %}",
])
def test_templates_reading_python_internals_are_invalid_specs(template: str) -> None:
    (problem,) = refused(one_task(template))
    assert problem.startswith("tasks[0] (a).prompt: line 1: '__")
    assert "is a Python internal, which templates may not read" in problem


def test_conditions_reading_python_internals_are_invalid_specs() -> None:
    (problem,) = refused(one_task("p", when="inputs.topic.__class__"))
    assert problem.startswith("tasks[0] (a).when: line 1: '__class__' is a Python internal")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{% set name = '__cla' ~ 'ss__' %}{{ ''[name] }}",  # built at render time: the sandbox refuses it
    "{{ self._TemplateReference__context }}",
])
def test_rendering_refuses_python_internals(template: str) -> None:
    with pytest.raises(TemplateError, match="Python internal|SecurityError: access to attribute .* is unsafe"):
        render(template, {})


def test_evaluating_a_condition_refuses_python_internals() -> None:
    with pytest.raises(TemplateError, match="condition .* failed: line 1: '__class__' is a Python internal"):
        evaluate("x.__class__", {"x": 1})


def test_yaml_python_tags_are_a_problem_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ntasks: [{{name: a, prompt: p}}]\n")
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(path)
    (problem,) = caught.value.problems
    assert problem.file == str(path) and problem.path == "line 1, column 7"
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'" in problem.message
    assert not marker.exists()


# --- the API key never leaks -------------------------------------------------------------------------------------


def assert_no_secret(where: str, text: str) -> None:
    """Neither the key nor a recognisable part of it is in `text`."""
    assert SECRET not in text, f"the API key appears in {where}"
    assert SECRET[:20] not in text, f"a prefix of the API key appears in {where}"


def assert_run_keeps_the_secret(instance: dg.DagsterInstance, run_id: str) -> None:
    """Nothing Dagster stored about the run holds the key: events, errors, metadata, run config, tags, snapshots
    (stored compressed, so a search of the files would miss them)."""
    for entry in instance.all_logs(run_id):
        assert_no_secret(f"event {entry.dagster_event_type}", serialize_value(entry) + str(entry))
    run = instance.get_run_by_id(run_id)
    assert_no_secret("the run (config and tags)", serialize_value(run))
    assert_no_secret("materializations", serialize_value(materializations(instance, run_id)))
    assert_no_secret("the job snapshot", serialize_value(instance.get_job_snapshot(run.job_snapshot_id)))
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    assert_no_secret("the execution plan snapshot", serialize_value(plan))


def assert_files_keep_the_secret(folder: Path) -> None:
    """No file under `folder` (run and event storage, compute logs) holds the key."""
    for file in (p for p in folder.rglob("*") if p.is_file()):
        assert SECRET.encode() not in file.read_bytes(), f"the API key appears in {file}"


@pytest.fixture
def keyed_server(llm_server_factory: Callable[..., RunningServer],
                 monkeypatch: pytest.MonkeyPatch) -> Callable[[str], RunningServer]:
    """Point the environment at a new loopback server that requires `required` as its key, with SECRET as ours."""

    def start(required: str) -> RunningServer:
        server = llm_server_factory(api_key=required)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        return server

    return start


def test_the_api_key_appears_in_no_log_event_error_or_stored_run(
        keyed_server: Callable[[str], RunningServer], instance: dg.DagsterInstance, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)  # the openai and httpx debug logs too
    path = write_workflow(tmp_path, FAN_OUT)
    accepting = keyed_server(SECRET)
    good = run_file(path, {}, instance)
    assert good.success, good.as_text()
    assert len(accepting.requests) == 4  # three greetings in two shards, one summary: the key was sent and taken
    rejecting = keyed_server("sk-test-the-key-the-server-wants")
    bad = run_file(path, {}, instance)
    assert not bad.success and "check OPENAI_API_KEY" in bad.as_text() and rejecting.requests
    echoing = keyed_server(SECRET)
    echoing.faults.add(status=400, body={"error": {"message": f"Incorrect API key provided: {SECRET}."}}, times=3)
    echoed = run_file(path, {}, instance)
    assert not echoed.success and "Incorrect API key provided: ***." in echoed.as_text()  # redacted by the client
    for outcome in (good, bad, echoed):
        assert_run_keeps_the_secret(instance, outcome.run_id)
        assert_no_secret("the run summary", json.dumps(outcome.as_json(), default=str) + outcome.as_text())
    out, err = capfd.readouterr()
    assert_no_secret("the Python log", caplog.text)
    assert_no_secret("stdout/stderr", out + err)
    assert_files_keep_the_secret(tmp_path)


def test_the_cli_never_prints_the_api_key(keyed_server: Callable[[str], RunningServer], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI's instance lives under the working folder
    path = write_workflow(tmp_path, FAN_OUT)
    runner = CliRunner()
    keyed_server(SECRET)
    good = runner.invoke(main, ["run", str(path), "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["status"] == "success"
    keyed_server("sk-test-the-key-the-server-wants")
    bad = runner.invoke(main, ["run", str(path), "--json"])
    assert bad.exit_code == 1 and "OPENAI_API_KEY" in bad.stdout
    for result in (good, bad):
        assert_no_secret("the CLI's output", result.stdout + result.stderr + repr(result.exception))
    with local_instance() as instance:  # the one the CLI used, under the working folder
        for result in (good, bad):
            assert_run_keeps_the_secret(instance, json.loads(result.stdout)["run_id"])
    assert_files_keep_the_secret(tmp_path)


# --- bad input loses no data -------------------------------------------------------------------------------------


def test_malformed_and_oversized_inbox_files_are_reported_and_left_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_workflows().specs["classify_tickets"]
    contents = {"broken.jsonl": b'{"id": 1, "subject": \n', "big.csv": b"id,subject,body\n" + b"1,a,b\n" * 40,
                "notes.txt": b"not a table"}
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
    monkeypatch.setenv("MP_MAX_TABLE_BYTES", "100")
    scan = scan_inbox(tmp_path, {}, check_table=table_checker(spec, "tickets"), settle_seconds=0, now=2e9)
    assert not scan.batches
    assert scan.files["broken.jsonl"].reason.startswith("malformed: input 'tickets': cannot read table")
    assert scan.files["big.csv"].reason.startswith("too large: input 'tickets': table file")
    assert "(MP_MAX_TABLE_BYTES)" in scan.files["big.csv"].reason
    assert {name: state.outcome for name, state in scan.files.items()} == dict.fromkeys(contents, "skipped")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == contents  # nothing moved, changed or deleted


def test_a_lower_input_limit_does_not_drop_a_workflow_with_a_long_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults and schedule inputs are bounded by the spec file's size, not by the run-time input limit."""
    monkeypatch.setenv("MP_MAX_INPUT_CHARS", "10")
    spec = parse_workflow({"name": "w", "inputs": {"topic": {"default": "x" * 50}},
                           "schedule": {"cron": "0 6 * * *", "inputs": {"topic": "y" * 50}},
                           "tasks": [{"name": "t", "prompt": "{{ inputs.topic }}"}]})
    assert spec.inputs["topic"].default == "x" * 50
