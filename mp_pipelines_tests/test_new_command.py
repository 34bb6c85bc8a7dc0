"""`mp-pipelines new`: every template writes a workflow that validates and runs offline; --list; where it writes;
what it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mp_pipelines.cli.main import main
from mp_pipelines.cli.new import TEMPLATES
from mp_pipelines.spec.loader import load_workflow_file


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # the CLI's local instance and ./workflows live under the working folder
    return CliRunner()


def test_list_shows_each_template_on_one_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["new", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == ["map_reduce", "classify", "plan_research_reflect", "extract_table"]
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_each_template_validates_and_runs_offline(template: str, runner: CliRunner, tmp_path: Path) -> None:
    name = f"my_{template}"
    result = runner.invoke(main, ["new", name, "--template", template, "--dir", "flows"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "flows" / f"{name}.yaml"
    assert f"wrote flows/{name}.yaml" in result.output
    assert f"next: mp-pipelines run flows/{name}.yaml" in result.output
    text = path.read_text()
    assert text.startswith("# ") and text.count("#") >= 5, "the workflow is commented"
    spec = load_workflow_file(path)
    assert spec.name == name and spec.description
    table_inputs = [n for n, declared in spec.inputs.items() if declared.type == "table"]
    for input_name in table_inputs:  # its sample data was written next to it
        default = tmp_path / "flows" / str(spec.inputs[input_name].default)
        assert default.exists() and (default.is_file() or any(default.iterdir()))

    run = runner.invoke(main, ["run", str(path), "--json", "--executor", "in_process"])
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert payload["status"] == "success" and payload["provider"] == "simulated"
    assert {task.name for task in spec.all_tasks()} <= set(payload["tasks"])
    assert all(task["status"] in ("success", "skipped") for task in payload["tasks"].values()), payload["tasks"]
    fan_out = [t.name for t in spec.all_tasks() if t.for_each is not None]
    for task in fan_out:  # every sample row got an answer
        assert len(payload["tasks"][task]["output"]) >= 2


def test_new_refuses_to_overwrite_unless_forced(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(main, ["new", "tickets", "-t", "classify"]).exit_code == 0
    path = tmp_path / "workflows" / "tickets.yaml"
    path.write_text(path.read_text() + "# my edit\n")
    again = runner.invoke(main, ["new", "tickets", "-t", "classify"])
    assert again.exit_code == 2
    assert f"{Path('workflows') / 'tickets.yaml'}, {Path('workflows/data/tickets/items.csv')} already exist" in again.output
    assert "--force" in again.output and "Traceback" not in again.output
    assert path.read_text().endswith("# my edit\n"), "a refused `new` writes nothing"
    forced = runner.invoke(main, ["new", "tickets", "-t", "classify", "--force"])
    assert forced.exit_code == 0, forced.output
    assert not path.read_text().endswith("# my edit\n")


def test_new_writes_to_dir_else_the_first_workflow_folder_else_workflows(runner: CliRunner, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("MP_WORKFLOWS_PATH", os.pathsep.join([str(first), str(second)]))
    result = runner.invoke(main, ["new", "on_path", "-t", "plan_research_reflect"])
    assert result.exit_code == 0 and (first / "on_path.yaml").is_file()
    assert "next: mp-pipelines run on_path\n" in result.output  # on MP_WORKFLOWS_PATH, so it runs by name
    assert runner.invoke(main, ["new", "given", "-t", "plan_research_reflect", "--dir", "mine"]).exit_code == 0
    assert (tmp_path / "mine" / "given.yaml").is_file() and not (first / "given.yaml").exists()
    monkeypatch.delenv("MP_WORKFLOWS_PATH")
    assert runner.invoke(main, ["new", "plain", "-t", "plan_research_reflect"]).exit_code == 0
    assert (tmp_path / "workflows" / "plain.yaml").is_file()


@pytest.mark.parametrize("args, reason", [
    (["new", "1st", "-t", "classify"], "workflow name '1st' is not an identifier"),
    (["new", "a__b", "-t", "classify"], "contains '__'"),
    (["new", "inputs", "-t", "classify"], "reserved for templates"),
    (["new", "fine", "-t", "nope"], "'nope' is not one of"),
    (["new", "fine"], "give --template"),
    (["new", "-t", "classify"], "give the new workflow's NAME"),
    (["new", "research_report", "-t", "classify"], "a workflow named 'research_report' already exists"),
])
def test_bad_names_and_templates_exit_2(args: list[str], reason: str, runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and reason in result.output, result.output
    assert not (tmp_path / "workflows").exists()
