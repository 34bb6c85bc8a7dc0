"""A newcomer's first hour, from the docs: every workflow the README and docs/ show validates and runs offline.

Every ```yaml block of README.md and docs/*.md whose top level has `name:` and `tasks:` is copied into a file and
checked with `mp-pipelines validate`; each one whose inputs all have defaults or are strings is run with
`mp-pipelines run --json` against the simulated model, as a user would from a fresh clone. A ```jinja block titled
`prompts/NAME` is a prompt library file the examples include: it is written next to them. The README's Python
example runs as written.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
STRING_VALUE = "a newcomer's first topic"
PROMPT_FILE = re.compile(r'^```jinja title="(prompts/[\w./-]+)"\n(.*?)^```', re.S | re.M)


def fenced_blocks(language: str) -> list[tuple[str, int, str]]:
    """(document name, line, text) of every fenced block in `language` in README.md and docs/*.md."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                found.append((doc.relative_to(REPO).as_posix(), text.count("\n", 0, match.start()) + 1, match.group(2)))
    return found


def workflow_blocks() -> list[tuple[str, dict[str, Any]]]:
    """(where, data) of every YAML block that is a workflow (top-level name and tasks)."""
    out = []
    for doc, line, text in fenced_blocks("yaml"):
        data = yaml.safe_load(text)
        if isinstance(data, dict) and "name" in data and "tasks" in data:
            out.append((f"{doc}:{line}", data))
    return out


WORKFLOWS = workflow_blocks()


def write_prompt_files(folder: Path) -> list[Path]:
    """Write every ```jinja title="prompts/NAME"``` block of the docs into `folder`, as the examples' prompt library."""
    written = []
    for doc in DOCS:
        for match in PROMPT_FILE.finditer(doc.read_text(encoding="utf-8")):
            path = folder / match.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(match.group(2), encoding="utf-8")
            written.append(path)
    return written


def cli() -> list[str]:
    exe = shutil.which("mp-pipelines")
    return [exe] if exe else [sys.executable, "-m", "mp_pipelines.cli"]


def offline_env() -> dict[str, str]:
    """The environment without endpoint settings or an instance: the simulated model, a fresh local instance."""
    drop = ("DAGSTER_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL", "MP_LLM_PROVIDER", "MP_WORKFLOWS_PATH",
            "MP_SIMULATED_FAILURE_RATE", "MP_SIMULATED_LATENCY")
    return {k: v for k, v in os.environ.items() if k not in drop}


def runnable_inputs(data: dict[str, Any]) -> dict[str, str] | None:
    """--input values for a workflow whose inputs all have defaults or are strings; None when it needs more."""
    values = {}
    for name, declared in (data.get("inputs") or {}).items():
        declared = declared or {}
        if declared.get("default") is not None:
            continue
        if declared.get("type", "string") != "string":
            return None
        values[name] = STRING_VALUE
    return values


def test_the_docs_show_workflows() -> None:
    assert any(where.startswith("README.md:") for where, _ in WORKFLOWS), "the README's workflow example is found"


def test_every_workflow_in_the_docs_validates(tmp_path: Path) -> None:
    assert write_prompt_files(tmp_path), "the README shows a prompt library file"
    files = []
    for index, (where, data) in enumerate(WORKFLOWS):
        path = tmp_path / f"doc_{index}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        files.append((where, path))
    completed = subprocess.run([*cli(), "validate", *(str(path) for _, path in files)], cwd=tmp_path,
                               env=offline_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, "\n".join(f"{where} → {path.name}" for where, path in files) + completed.stdout
    assert f"{len(files)} workflow(s) valid, 0 problem(s)" in completed.stdout


@pytest.mark.parametrize("where, data", [w for w in WORKFLOWS if runnable_inputs(w[1]) is not None],
                         ids=[w[0] for w in WORKFLOWS if runnable_inputs(w[1]) is not None])
def test_every_runnable_workflow_in_the_docs_runs_offline(where: str, data: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "from_docs.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    write_prompt_files(tmp_path)
    pairs = [arg for name, value in (runnable_inputs(data) or {}).items() for arg in ("--input", f"{name}={value}")]
    completed = subprocess.run([*cli(), "run", str(path), *pairs, "--json"], cwd=tmp_path, env=offline_env(),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"{where}: {completed.stderr[-3000:]}"
    payload = json.loads(completed.stdout)
    assert payload["status"] == "success" and payload["provider"] == "simulated"
    assert set(payload["tasks"]) >= {task["name"] for task in data["tasks"]}
    assert all(task["status"] in ("success", "skipped") for task in payload["tasks"].values()), payload["tasks"]
    assert "Traceback" not in completed.stderr


def test_the_readme_python_example_builds_validates_writes_and_runs(tmp_path: Path) -> None:
    [(_, line, code)] = [block for block in fenced_blocks("python") if block[0] == "README.md"]
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=offline_env(), capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, f"README.md:{line}: {completed.stderr[-3000:]}"
    status, facts = completed.stdout.splitlines()[:2]
    assert status == "success 3"
    cities = ["Lisbon", "Oslo", "Kyoto"]
    answers = ast.literal_eval(facts)
    assert len(answers) == 3 and all(city in fact for city, fact in zip(cities, answers))  # each item in its answer
    written = yaml.safe_load((tmp_path / "city_notes.yaml").read_text())
    assert written["name"] == "city_notes" and written["breadth"] == 4 and written["limits"] == {
        "requests_per_minute": 600.0}
    again = subprocess.run([*cli(), "validate", "city_notes.yaml"], cwd=tmp_path, env=offline_env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout
