"""The Dagster Component `mp_pipelines.PromptWorkflow` in a real `dg` project.

A throw-away project is made with `create-dagster project --no-uv-sync` in a temporary folder and used with the
active environment (this checkout first on PYTHONPATH). One workflow is added with `dg scaffold defs`, and the
README's inline `defs.yaml` example is added as a second; then `dg check defs` passes, `dg list defs --json` lists
their jobs, assets and sensors, `dg list components --json` shows the component, and `dg launch --job` runs both
jobs offline against the simulated model, each materializing its task's asset. An inline prompt's `{{ }}` must
reach the workflow unrendered by Dagster, and a bad workflow fails `dg check defs` naming file, field and reason.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mp_pipelines.components import PromptWorkflow, PromptWorkflowError
from mp_pipelines_tests.services import unavailable

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINT_GROUP = "dagster_dg_cli.registry_modules"
COMPONENT = "mp_pipelines.PromptWorkflow"
TIMEOUT = 300
FENCE = re.compile(r"^```yaml[^\n]*\n(.*?)^```", re.S | re.M)


def readme_component_examples() -> list[dict[str, Any]]:
    """Every ```yaml block of README.md that declares a PromptWorkflow component."""
    blocks = [yaml.safe_load(text) for text in FENCE.findall((REPO / "README.md").read_text(encoding="utf-8"))]
    return [data for data in blocks if isinstance(data, dict) and data.get("type") == COMPONENT]


def declared_entry_points() -> dict[str, list[str]]:
    """setup.py's entry_points argument, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py declares no entry_points")


def entry_point_dir(root: Path) -> list[str]:
    """PYTHONPATH entries that make `dg` find the component: none when the installed mp-pipelines declares the
    entry point; otherwise a distribution record built from setup.py's declaration (an install made before the
    entry point was added does not have it until reinstalled)."""
    declared = declared_entry_points().get(ENTRY_POINT_GROUP, [])
    assert "mp_pipelines = mp_pipelines" in declared, declared
    if any(ep.value == "mp_pipelines" for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)):
        return []
    record = root / "mp_pipelines-0.1.0.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: mp-pipelines\nVersion: 0.1.0\n", encoding="utf-8")
    (record / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(declared) + "\n",
                                             encoding="utf-8")
    return [str(root)]


class DgProject:
    """A scaffolded `dg` project and the environment its commands run in."""

    def __init__(self, root: Path, env: dict[str, str], home: Path) -> None:
        self.root, self.env, self.home = root, env, home
        self.defs = root / "src" / root.name / "defs"

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                                   timeout=TIMEOUT)
        if ok and completed.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {completed.returncode}\n--- stdout\n{completed.stdout[-6000:]}"
                        f"\n--- stderr\n{completed.stderr[-6000:]}")
        return completed


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"`{name}` is not installed; pip install -e '.[dev]' (dagster-dg-cli, create-dagster)")
    return path


def make_project(folder: Path) -> DgProject:
    """`create-dagster project --no-uv-sync` in `folder`, run with this checkout and a fresh DAGSTER_HOME."""
    home = folder / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    root = folder / "prompt_project"
    drop = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MP_LLM_PROVIDER", "MP_WORKFLOWS_PATH", "MP_SIMULATED_LATENCY",
            "MP_SIMULATED_FAILURE_RATE", "MP_STEP_STORAGE_DIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    paths = [*entry_point_dir(folder / "entry_point"), str(REPO), str(root / "src"), env.get("PYTHONPATH", "")]
    env.update({"PYTHONPATH": os.pathsep.join(p for p in paths if p), "DAGSTER_HOME": str(home),
                "DAGSTER_DG_UPDATE_CHECK_ENABLED": "0", "NO_COLOR": "1", "COLUMNS": "200"})
    project = DgProject(root, env, home)
    project.root = folder  # create-dagster runs in the parent folder
    project.run(tool("create-dagster"), "project", "--no-uv-sync", root.name)
    project.root = root
    assert (root / "pyproject.toml").is_file() and project.defs.is_dir(), sorted(p.name for p in root.iterdir())
    with (root / "pyproject.toml").open("a", encoding="utf-8") as handle:
        handle.write("\n[tool.dg.cli.telemetry]\nenabled = false\n")
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DgProject]:
    """A dg project with a scaffolded workflow (`briefs`) and the README's inline example (`inline_example`)."""
    tool("dg")
    made = make_project(tmp_path_factory.mktemp("dg"))
    made.run(tool("dg"), "scaffold", "defs", COMPONENT, "briefs")
    [inline] = [data for data in readme_component_examples() if "workflow" in data["attributes"]]
    (made.defs / "inline_example").mkdir()
    (made.defs / "inline_example" / "defs.yaml").write_text(yaml.safe_dump(inline, sort_keys=False), encoding="utf-8")
    yield made


def launched_run(project: DgProject, job: str, *config: str) -> Any:
    """Launch `job` with `dg launch` and return the finished run's record from the project's instance."""
    import dagster as dg

    project.run(tool("dg"), "launch", "--job", job, *config)
    with dg.DagsterInstance.from_config(str(project.home)) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name=job))
        assert runs, f"no run of {job} recorded in {project.home}"
        run = runs[0]
        materialized = {}
        for key in instance.get_asset_keys():
            for record in instance.fetch_materializations(key, limit=10).records:
                if record.run_id == run.run_id and record.asset_materialization is not None:
                    materialized[tuple(key.path)] = record.asset_materialization.metadata
        return run.status, materialized


def test_scaffold_writes_a_defs_yaml_pointing_at_a_starter_workflow(project: DgProject) -> None:
    folder = project.defs / "briefs"
    assert yaml.safe_load((folder / "defs.yaml").read_text()) == {
        "type": COMPONENT, "attributes": {"workflow_file": "workflow.yaml"}}
    starter = yaml.safe_load((folder / "workflow.yaml").read_text())
    assert starter["name"] == "briefs" and [task["name"] for task in starter["tasks"]] == ["summary"]


def test_dg_lists_the_component(project: DgProject) -> None:
    listed = json.loads(project.run(tool("dg"), "list", "components", "--json").stdout)
    keys = {item["key"]: item for item in listed["items"]}
    assert COMPONENT in keys, sorted(keys)
    assert "prompt workflow" in keys[COMPONENT]["summary"]


def test_dg_check_defs_passes_and_list_defs_shows_jobs_assets_and_sensors(project: DgProject) -> None:
    checked = project.run(tool("dg"), "check", "defs")
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = json.loads(project.run(tool("dg"), "list", "defs", "--json").stdout)
    jobs = {job["name"]: job for job in listed["jobs"]}
    assert {"briefs", "inline_example"} <= set(jobs), sorted(jobs)
    assert jobs["briefs"]["source"].endswith("defs/briefs/defs.yaml:1")
    assets = {asset["asset_key"]: asset for asset in listed["assets"]}
    assert {"briefs/summary", "inline_example/facts", "inline_example/haiku"} <= set(assets), sorted(assets)
    assert "inline_example/facts" in assets["inline_example/haiku"]["dependency_keys"]
    # Dagster renders {{ }} in defs.yaml; the inline workflow's prompts must arrive as written
    assert "{{ inputs.topic }}" in assets["inline_example/facts"]["description"]
    sensors = {sensor["name"] for sensor in listed["sensors"]}
    assert {"briefs_run_failure_sensor", "inline_example_run_failure_sensor"} <= sensors, sensors
    assert {"llm", "budget"} <= {resource["name"] for resource in listed["resources"]}


def test_the_jobs_run_offline_and_materialize_their_assets(project: DgProject) -> None:
    import dagster as dg

    status, materialized = launched_run(project, "briefs")
    assert status == dg.DagsterRunStatus.SUCCESS
    assert ("briefs", "summary") in materialized, sorted(materialized)
    metadata = materialized[("briefs", "summary")]
    assert metadata["provider"].value == "simulated"
    assert "tide pools" in metadata["preview"].value  # the starter's default topic, rendered at run time

    config = json.dumps({"ops": {"inputs": {"config": {"topic": "sea otters"}}}})
    status, materialized = launched_run(project, "inline_example", "--config-json", config)
    assert status == dg.DagsterRunStatus.SUCCESS
    assert {("inline_example", "facts"), ("inline_example", "haiku")} <= set(materialized), sorted(materialized)
    assert "sea otters" in materialized[("inline_example", "facts")]["preview"].value


def test_a_bad_workflow_fails_dg_check_defs_with_file_field_and_reason(project: DgProject, tmp_path: Path) -> None:
    bad = DgProject(tmp_path / "bad_project", project.env, project.home)
    shutil.copytree(project.root, bad.root)
    bad.env = {**project.env, "PYTHONPATH": project.env["PYTHONPATH"].replace(str(project.root), str(bad.root))}
    bad.defs = bad.root / "src" / project.root.name / "defs"
    shutil.rmtree(bad.defs / "inline_example")
    defs_yaml = bad.defs / "typo" / "defs.yaml"
    defs_yaml.parent.mkdir()
    defs_yaml.write_text(yaml.safe_dump({"type": COMPONENT, "attributes": {"workflow": {
        "name": "typo", "tasks": [{"name": "one", "promt": "Hello {{ inputs.topic }}"}]}}}), encoding="utf-8")
    checked = bad.run(tool("dg"), "check", "defs", ok=False)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert f"{defs_yaml}: attributes.workflow.tasks[0] (one).promt: unknown key 'promt'; did you mean 'prompt'?" \
        in output, output

    defs_yaml.write_text(f"type: {COMPONENT}\nattributes:\n  workflow_file: missing.yaml\n", encoding="utf-8")
    checked = bad.run(tool("dg"), "check", "defs", ok=False)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert f"{defs_yaml}: attributes.workflow_file:" in output, output
    assert f"{defs_yaml.parent / 'missing.yaml'}: workflow file does not exist" in output, output


def test_scaffold_refuses_a_missing_copy_from_as_bad_usage(project: DgProject) -> None:
    missing = project.root / "no_such_workflow.yaml"
    completed = project.run(tool("dg"), "scaffold", "defs", COMPONENT, "copied", "--copy-from", str(missing), ok=False)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert f"Invalid value for --copy-from: {missing} is not a workflow file" in completed.stderr
    assert "Traceback" not in completed.stderr
    shutil.rmtree(project.defs / "copied", ignore_errors=True)  # dg makes the folder before asking the scaffolder


@pytest.mark.parametrize("attributes, reason", [
    ({}, "give exactly one of workflow_file and workflow (neither given)"),
    ({"workflow_file": "w.yaml", "workflow": {"name": "w"}}, "give exactly one of workflow_file and workflow (both given)"),
    ({"workflow": {}}, "defs.yaml: attributes.workflow.name: missing required key 'name'"),
])
def test_attribute_mistakes_name_the_defs_yaml(attributes: dict[str, Any], reason: str, tmp_path: Path) -> None:
    with pytest.raises(PromptWorkflowError) as raised:
        PromptWorkflow.model_validate(attributes).load_spec(tmp_path)
    assert str(tmp_path / "defs.yaml") in str(raised.value) and reason in str(raised.value), str(raised.value)


def test_an_inline_workflow_keeps_its_prompt_and_reads_tables_beside_the_defs_yaml(tmp_path: Path) -> None:
    spec, base_dir = PromptWorkflow.model_validate({"workflow": {
        "name": "w", "inputs": {"topic": {"type": "string"}},
        "tasks": [{"name": "a", "prompt": "{{ inputs.topic }}?"}]}}).load_spec(tmp_path)
    assert spec.tasks[0].prompt == "{{ inputs.topic }}?" and base_dir == tmp_path
