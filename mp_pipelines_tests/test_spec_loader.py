"""Tests of spec/loader.py: Pydantic errors as field paths, YAML reading, folder loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mp_pipelines.spec.loader import (
    SHIPPED_WORKFLOWS_DIR,
    Problem,
    WorkflowValidationError,
    load_workflow_file,
    load_workflows,
    parse_workflow,
    workflow_dirs,
)

SPECS = Path(__file__).parent / "data" / "specs"
GOOD = "name: {name}\ntasks:\n  - name: hello\n    prompt: Say hello\n"


def problems_of(data: Any) -> list[Problem]:
    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(data, source="wf.yaml")
    return caught.value.problems


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_problem_str_omits_missing_parts() -> None:
    assert str(Problem("a.yaml", "tasks[0].prompt", "too short")) == "a.yaml: tasks[0].prompt: too short"
    assert str(Problem(None, "name", "bad")) == "name: bad"
    assert str(Problem("a.yaml", "", "empty")) == "a.yaml: empty"


def test_error_lists_every_problem_under_a_summary() -> None:
    error = WorkflowValidationError([Problem("f.yaml", "a", "x"), Problem("f.yaml", "b", "y")])
    lines = str(error).splitlines()
    assert lines[0] == "2 problems in f.yaml"
    assert lines[1].strip() == "f.yaml: a: x" and lines[2].strip() == "f.yaml: b: y"
    assert isinstance(error, ValueError)


def test_unknown_key_is_reported_with_a_suggestion() -> None:
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(SPECS / "typo_key.yaml")
    [problem] = caught.value.problems
    assert problem.file == str(SPECS / "typo_key.yaml")
    assert problem.path == "tasks[0] (plan).depend_on"
    assert "unknown key 'depend_on'" in problem.message and "did you mean 'depends_on'?" in problem.message


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    [problem] = problems_of({"name": "w", "zzz": 1, "tasks": [{"name": "a", "prompt": "p"}]})
    assert problem.path == "zzz"
    assert "unknown key 'zzz'" in problem.message and "allowed:" in problem.message and "tasks" in problem.message


def loop_with(body: dict[str, Any], **control: Any) -> dict[str, Any]:
    return {"name": "w", "tasks": [{"name": "refine", "loop": control, "tasks": [body]}]}


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"name": "w", "tasks": [{"name": "a", "prompt": "p", "output": "xml"}]}, "tasks[0] (a).output",
         ["'text' or 'json'", "got 'xml'"]),
        (loop_with({"name": "critique"}), "tasks[0] (refine).tasks[0] (critique).prompt",
         ["missing required key 'prompt'"]),
        (loop_with({"name": "c", "prompt": "p"}, max_iterations=0), "tasks[0] (refine).loop.max_iterations",
         ["greater than or equal to 1"]),
        ({"name": "w", "inputs": {"topic": {"type": "text"}}, "tasks": [{"name": "a", "prompt": "p"}]},
         "inputs.topic.type", ["'string'", "got 'text'"]),
        ({"name": "w",
          "inputs": {"n": {"type": "integer", "default": "many"}}, "tasks": [{"name": "a", "prompt": "p"}]},
         "inputs.n", ["default must be an integer", "'many'"]),
        ({"name": "w", "schedule": "every day", "tasks": [{"name": "a", "prompt": "p"}]}, "schedule.cron",
         ["not a valid cron string"]),
        ({"name": "my-flow", "tasks": [{"name": "a", "prompt": "p"}]}, "name", ["not an identifier"]),
        ({"name": "w", "tasks": []}, "tasks", ["at least 1 item"]),
        ({"name": "w", "tasks": ["hello"]}, "tasks[0]", ["valid dictionary"]),
        ({"name": "w", "tasks": [{"name": "a", "prompt": "p", "retries": {"max_retry": 2}}]},
         "tasks[0] (a).retries.max_retry",
         ["did you mean 'max_retries'?"]),
        ({"name": "w", "tasks": [{"name": "a", "prompt": "p", "output_schema": {"type": "array"}}]}, "tasks[0] (a)",
         ["output_schema is set but output is 'text'"]),
    ],
)
def test_pydantic_errors_become_readable_paths(data: dict[str, Any], path: str, words: list[str]) -> None:
    [problem] = problems_of(data)
    assert problem.path == path
    assert problem.file == "wf.yaml"
    for word in words:
        assert word in problem.message
    assert "Value error" not in problem.message


def test_every_structural_problem_is_reported() -> None:
    data = {"name": "w", "depht": 2, "tasks": [{"name": "a"}, {"name": "b", "prompt": "p", "timeout": -1}]}
    paths = {problem.path for problem in problems_of(data)}
    assert paths == {"depht", "tasks[0] (a).prompt", "tasks[1] (b).timeout"}


@pytest.mark.parametrize("data", [None, [1, 2], "name: x"])
def test_data_that_is_not_a_mapping_is_a_problem(data: Any) -> None:
    [problem] = problems_of(data)
    assert problem.path == "" and "must be a mapping" in problem.message


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "name: w\ntasks:\n  - name: a\n    prompt: [unclosed\n")
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(path)
    [problem] = caught.value.problems
    assert problem.file == str(path) and problem.path.startswith("line ") and "column" in problem.path
    assert "invalid YAML" in problem.message


def test_repeated_yaml_key_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "twice.yaml", GOOD.format(name="w") + "    prompt: again\n")
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(path)
    assert "line 5" in caught.value.problems[0].path
    assert "'prompt' appears twice" in caught.value.problems[0].message


def test_missing_and_empty_files_are_problems(tmp_path: Path) -> None:
    with pytest.raises(WorkflowValidationError, match="does not exist") as caught:
        load_workflow_file(tmp_path / "nope.yaml")
    assert caught.value.problems[0].file == str(tmp_path / "nope.yaml")
    with pytest.raises(WorkflowValidationError, match="empty"):
        load_workflow_file(write(tmp_path, "empty.yaml", "# nothing here\n"))


def test_bad_file_does_not_stop_the_others(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="alpha"))
    bad = write(tmp_path, "b.yaml", "name: beta\ntasks:\n  - name: x\n")
    write(tmp_path, "c.yml", GOOD.format(name="gamma"))
    write(tmp_path, "notes.txt", "not a workflow")
    write(tmp_path / "nested", "d.yaml", GOOD.format(name="delta"))  # folders are not searched recursively
    result = load_workflows([tmp_path])
    assert list(result.specs) == ["alpha", "gamma"]
    assert result.sources == {"alpha": tmp_path / "a.yaml", "gamma": tmp_path / "c.yml"}
    assert [(p.file, p.path) for p in result.problems] == [(str(bad), "tasks[0] (x).prompt")]


def test_explicit_file_paths_load(tmp_path: Path) -> None:
    result = load_workflows([write(tmp_path, "any.txt", GOOD.format(name="alpha"))])
    assert list(result.specs) == ["alpha"] and not result.problems


def test_duplicate_names_name_both_files_and_the_first_wins(tmp_path: Path) -> None:
    first = write(tmp_path / "one", "x.yaml", GOOD.format(name="same"))
    second = write(tmp_path / "two", "x.yaml", GOOD.format(name="same").replace("Say hello", "Say bye"))
    result = load_workflows([tmp_path / "one", tmp_path / "two"])
    assert result.sources == {"same": first}
    assert result.specs["same"].tasks[0].prompt == "Say hello"
    [problem] = result.problems
    assert problem.file == str(second) and str(first) in problem.message and "'same'" in problem.message


def test_workflow_dirs_start_with_shipped_then_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MP_WORKFLOWS_PATH", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert workflow_dirs() == [SHIPPED_WORKFLOWS_DIR, tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv("MP_WORKFLOWS_PATH")
    assert workflow_dirs() == [SHIPPED_WORKFLOWS_DIR]
    assert SHIPPED_WORKFLOWS_DIR.name == "workflows" and SHIPPED_WORKFLOWS_DIR.parent.name == "mp_pipelines"


def test_env_folders_load_and_a_missing_one_is_a_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "extra", "mine.yaml", GOOD.format(name="zz_env_workflow"))
    missing = tmp_path / "missing"
    monkeypatch.setenv("MP_WORKFLOWS_PATH", os.pathsep.join([str(tmp_path / "extra"), str(missing)]))
    result = load_workflows()
    assert result.sources["zz_env_workflow"] == tmp_path / "extra" / "mine.yaml"
    missing_problems = [p for p in result.problems if p.file == str(missing)]
    assert len(missing_problems) == 1
    assert "does not exist" in missing_problems[0].message and "MP_WORKFLOWS_PATH" in missing_problems[0].message


def test_missing_explicit_path_is_a_problem(tmp_path: Path) -> None:
    result = load_workflows([tmp_path / "nowhere"])
    assert result.specs == {} and [p.file for p in result.problems] == [str(tmp_path / "nowhere")]
