"""Allowed input roots: which folders a file or folder input may be read from, on every way a run starts.

Real files, links and Dagster runs; the model is the loopback OpenAI-compatible server, whose request log shows
that a refused input was never read. Launchpad/GraphQL launches through the proxy: test_access_control.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from mp_pipelines.cli.main import main
from mp_pipelines.definitions import build_definitions
from mp_pipelines.spec.loader import load_workflows
from mp_pipelines.spec.paths import SAMPLE_DATA, InputPathError, input_roots
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.test_sensors import Inbox, put, tickets_csv
from mp_pipelines_tests.workflow_helpers import write_workflow

CANARY = "CANARY-not-for-the-model-0b7c"
NOTES = {"name": "notes_digest", "inputs": {"notes": {"type": "table"}},
         "tasks": [{"name": "digest", "for_each": "inputs.notes", "prompt": "Digest: {{ item.text }}"}]}


def test_default_roots_are_the_workflow_folder_the_samples_the_inbox_and_a_local_runs_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workflows, inbox, here = tmp_path / "wf", tmp_path / "inbox", tmp_path / "here"
    assert input_roots(workflow_dir=workflows, inbox=inbox).folders == (workflows, SAMPLE_DATA, inbox)
    monkeypatch.setenv("MP_LOCAL_RUN_DIR", str(here))
    roots = input_roots(workflow_dir=workflows, inbox=inbox)
    assert roots.folders == (workflows, SAMPLE_DATA, inbox, here)
    assert SAMPLE_DATA == Path(__file__).resolve().parents[1] / "mp_pipelines" / "workflows" / "data"


def test_configured_roots_replace_the_defaults_but_keep_the_sample_data(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_LOCAL_RUN_DIR", str(tmp_path / "here"))
    monkeypatch.setenv("MP_INPUT_ROOTS", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    roots = input_roots(workflow_dir=tmp_path / "wf", inbox=tmp_path / "inbox")
    assert roots.folders == (tmp_path / "a", tmp_path / "b", SAMPLE_DATA)
    assert "MP_INPUT_ROOTS plus the shipped sample data" in roots.source


def test_paths_leaving_the_roots_are_refused_by_dots_absolute_paths_and_links(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.csv").write_text(f"text\n{CANARY}\n")
    (allowed / "ok.csv").write_text("text\nfine\n")
    (allowed / "link.csv").symlink_to(outside / "secret.csv")
    (allowed / "folder_link").symlink_to(outside, target_is_directory=True)
    roots = input_roots(workflow_dir=allowed, inbox=tmp_path / "inbox")
    assert roots.resolve("ok.csv", what="input 'notes': path 'ok.csv'", base_dir=allowed) == allowed / "ok.csv"
    for value in ("../outside/secret.csv", str(outside / "secret.csv"), "link.csv", "folder_link",
                  str(outside / "does-not-exist.csv")):
        with pytest.raises(InputPathError) as refused:
            roots.resolve(value, what=f"input 'notes': path {value!r}", base_dir=allowed)
        message = str(refused.value)
        assert message.startswith(f"input 'notes': path {value!r}")
        assert "is outside the allowed input roots" in message and repr(str(allowed)) in message
        assert repr(str(SAMPLE_DATA)) in message and "MP_INPUT_ROOTS" in message
        assert "does not exist" not in message  # no telling which files exist outside the roots


def test_a_local_run_reads_from_its_folder_and_nothing_outside_the_roots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openai_env: RunningServer) -> None:
    """`mp-pipelines run` from a folder reads a table given relative to it; with MP_INPUT_ROOTS elsewhere the
    same run is refused before it starts (exit 2) and the model is never called."""
    here = tmp_path / "project"
    (here / "notes").mkdir(parents=True)
    (here / "notes" / "a.txt").write_text(f"{CANARY} in a note")
    path = write_workflow(tmp_path, NOTES)
    monkeypatch.chdir(here)
    openai_env.reset()
    ran = CliRunner().invoke(main, ["run", str(path), "--input", "notes=notes", "--json"], catch_exceptions=False)
    assert ran.exit_code == 0, ran.output
    assert len(openai_env.requests) == 1 and CANARY in json.dumps(openai_env.requests[0].body)

    openai_env.reset()
    monkeypatch.setenv("MP_INPUT_ROOTS", str(tmp_path / "elsewhere"))
    refused = CliRunner().invoke(main, ["run", str(path), "--input", "notes=notes", "--json"],
                                 catch_exceptions=False)
    assert refused.exit_code == 2  # refused before the run starts, as a usage error
    assert "input 'notes': path 'notes'" in refused.output and "outside the allowed input roots" in refused.output
    assert "Traceback" not in refused.output
    assert openai_env.requests == []


def test_a_run_outside_the_cli_does_not_get_its_working_folder_as_a_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance) -> None:
    """What the webserver's and daemon's runs do: the job from the definitions, whose working folder is not a root
    (only the local commands, `run_workflow` and `resume_run`, mark theirs)."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text(CANARY)
    workflows = tmp_path / "wf"
    workflows.mkdir()
    write_workflow(workflows, NOTES)
    monkeypatch.chdir(tmp_path)
    job = build_definitions(load_workflows([workflows])).get_job_def("notes_digest")

    def run(notes: str) -> dg.ExecuteInProcessResult:
        return job.execute_in_process(run_config={"ops": {"inputs": {"config": {"notes": notes}}}},
                                      instance=instance, raise_on_error=False)

    relative = run("notes")  # resolved against the workflow's folder only, where there is no such folder
    assert not relative.success
    message = relative.failure_data_for_node("notes_digest__digest.digest__items").error.message
    assert f"{str(workflows / 'notes')!r} does not exist" in message and CANARY not in message
    absolute = run(str(tmp_path / "notes"))
    assert not absolute.success
    message = absolute.failure_data_for_node("inputs").error.message
    assert f"input 'notes': path {str(tmp_path / 'notes')!r} is outside the allowed input roots" in message
    assert repr(str(workflows)) in message and message.count(repr(str(SAMPLE_DATA))) == 1


def test_the_inbox_sensor_reads_only_inside_the_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      instance: dg.DagsterInstance) -> None:
    """The inbox is a default root; with MP_INPUT_ROOTS set without it, files there are skipped unread, naming
    the roots, and taken once the inbox is listed."""
    monkeypatch.setenv("MP_INBOX_DIR", str(tmp_path / "inbox"))
    folder = tmp_path / "inbox" / "classify_tickets"
    folder.mkdir(parents=True)
    put(folder, "monday.csv", tickets_csv())
    assert [r.partition_key for r in Inbox(instance).tick().run_requests] == ["monday.csv"]

    monkeypatch.setenv("MP_INPUT_ROOTS", str(tmp_path / "elsewhere"))
    sensor = Inbox(instance)
    result = sensor.tick()
    assert not result.run_requests
    state = json.loads(result.cursor)["files"]["monday.csv"]
    assert state["outcome"] == "skipped" and state["sha256"] is None  # refused before it was hashed
    assert "outside the allowed input roots" in state["reason"] and "MP_INPUT_ROOTS" in state["reason"]

    monkeypatch.setenv("MP_INPUT_ROOTS", os.pathsep.join([str(tmp_path / "elsewhere"), str(tmp_path / "inbox")]))
    assert [r.partition_key for r in Inbox(instance).tick().run_requests] == ["monday.csv"]
