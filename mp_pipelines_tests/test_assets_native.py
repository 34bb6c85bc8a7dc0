"""Tasks are real, materializable assets: the Catalog can materialize them, subsets read upstream values from their
latest materialization, code versions mark changed prompts (and what is downstream) unsynced, and a subset whose
upstream was never materialized fails with one sentence saying what to do.

The webserver and daemon are real processes on PostgreSQL; `mp-pipelines run` runs against the same instance; the
browser test drives Debian's Chromium.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from mp_pipelines import definitions
from mp_pipelines.factory.fanout import TABLE_ROWS, fanout_metadata
from mp_pipelines.factory.names import task_step
from mp_pipelines.spec.loader import LoadResult, load_workflows
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.versions import task_code_version, template_sources
from mp_pipelines_tests.postgres import temporary_database
from mp_pipelines_tests.services import (
    LOCATION,
    REPO,
    DagsterServices,
    dagster_services,
    pg_env,
    wait_for,
    write_instance_config,
)
from mp_pipelines_tests.test_ui_browser import require_browser, ui_page
from mp_pipelines_tests.workflow_helpers import write_workflow

REPOSITORY = "__repository__"  # the repository name Dagster gives a code location's Definitions
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
CHAIN = {"name": "versioned", "inputs": {"topic": {"type": "string", "default": "tides"}},
         "tasks": [{"name": "outline", "prompt": "Outline {{ inputs.topic }}"},
                   {"name": "expand", "prompt": "Expand: {{ outline }}"},
                   {"name": "polish", "prompt": "Polish: {{ expand }}"},
                   {"name": "aside", "prompt": "A fact about {{ inputs.topic }}"}]}
# A blocking error check the simulated model's answers ("[simulated] Response to: …") can never pass.
GATED = {"name": "gated", "inputs": {"topic": {"type": "string", "default": "tides"}},
         "tasks": [{"name": "headline", "prompt": "A headline about {{ inputs.topic }}",
                    "checks": [{"type": "matches", "name": "starts_with_headline", "pattern": "^Headline:",
                                "blocking": True}]},
                   {"name": "article", "prompt": "An article under the headline {{ headline }}"}]}


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServices]:
    """Webserver + daemon on a fresh PostgreSQL database; the extra workflow folder holds `versioned` and `gated`."""
    root = tmp_path_factory.mktemp("assets")
    home = root / "dagster_home"
    write_instance_config(home)
    workflows = root / "workflows"
    workflows.mkdir()
    write_workflow(workflows, CHAIN)
    write_workflow(workflows, GATED)
    with temporary_database() as dbname, dagster_services(
            home, {**pg_env(dbname), "MP_WORKFLOWS_PATH": str(workflows)}) as running:
        yield running


def cli_run(services: DagsterServices, *args: str, exit_code: int = 0) -> dict[str, Any]:
    """`mp-pipelines run ... --json` (this checkout) against the services' instance; its JSON summary."""
    done = subprocess.run([sys.executable, "-m", "mp_pipelines.cli", "run", *args, "--json"], cwd=REPO,
                          env={**services.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == exit_code, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout)


def asset_nodes(services: DagsterServices, workflow: str) -> dict[str, dict[str, Any]]:
    data = services.graphql("""{ assetNodes { assetKey { path } isMaterializable isExecutable isObservable
        jobNames opNames staleStatus opVersion assetMaterializations(limit: 1) { runId } } }""")
    return {node["assetKey"]["path"][1]: node for node in data["assetNodes"] if node["assetKey"]["path"][0] == workflow}


def launch(services: DagsterServices, job: str, assets: list[list[str]], run_config: dict[str, Any]) -> str:
    """`launchPipelineExecution` of `job` with an asset selection, as the Catalog's Materialize does."""
    data = services.graphql("""mutation($params: ExecutionParams!) { launchPipelineExecution(executionParams: $params) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
        ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }""",
                            {"params": {"selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                                                     "jobName": job, "assetSelection": [{"path": p} for p in assets]},
                                        "runConfigData": yaml.safe_dump(run_config)}})
    result = data["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def finished(services: DagsterServices, run_id: str) -> str:
    wait_for(lambda: services.run_status(run_id) in FINISHED, 240, f"run {run_id} to finish",
             diagnostics=services.diagnostics)
    return services.run_status(run_id)


def run_steps(services: DagsterServices, run_id: str) -> dict[str, str]:
    data = services.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { stepStats { stepKey status } } } }",
                            {"id": run_id})
    return {s["stepKey"]: s["status"] for s in data["runOrError"]["stepStats"]}


def materialized_in(services: DagsterServices, workflow: str, run_id: str) -> set[str]:
    data = services.graphql("""{ assetNodes { assetKey { path } assetMaterializations(limit: 5) { runId } } }""")
    return {n["assetKey"]["path"][1] for n in data["assetNodes"] if n["assetKey"]["path"][0] == workflow
            and any(m["runId"] == run_id for m in n["assetMaterializations"])}


def test_after_a_cli_run_every_task_is_a_materializable_asset_with_its_latest_materialization(
        services: DagsterServices) -> None:
    spec = load_workflows().specs["research_report"]
    # in the code location: every task, loop body task and loop is an executable asset, none external
    graph = definitions.defs().resolve_asset_graph()
    for task in [*spec.all_tasks(), *spec.tasks]:
        node = graph.get(dg.AssetKey(["research_report", task.name]))
        assert node.is_materializable and node.is_executable and not node.is_external, task.name
    outcome = cli_run(services, "research_report", "--input", "topic=tides", "--input", "max_questions=2")
    assert outcome["status"] == "success"
    nodes = asset_nodes(services, "research_report")
    tasks = {"plan", "research", "draft", "critique", "revise", "refine", "report"}
    assert tasks | {"inputs"} == set(nodes)
    for name in tasks:
        node = nodes[name]
        assert node["isMaterializable"] and node["isExecutable"] and not node["isObservable"], node
        assert "research_report" in node["jobNames"], node  # the workflow's job materializes it
        assert node["assetMaterializations"] == [{"runId": outcome["run_id"]}], node
        assert node["opVersion"] and node["staleStatus"] == "FRESH", node


def test_materializing_only_report_through_graphql_runs_only_its_step(services: DagsterServices) -> None:
    first = cli_run(services, "research_report", "--input", "topic=tides", "--input", "max_questions=2")
    run_id = launch(services, "research_report", [["research_report", "report"]], {})
    assert finished(services, run_id) == "SUCCESS", services.run_errors(run_id)
    assert run_steps(services, run_id) == {task_step("research_report", "report"): "SUCCESS"}
    assert materialized_in(services, "research_report", run_id) == {"report"}
    # its upstream values came from the full run's materializations: the report's prompt quotes them
    nodes = asset_nodes(services, "research_report")
    assert nodes["draft"]["assetMaterializations"] == [{"runId": first["run_id"]}]
    assert nodes["report"]["assetMaterializations"] == [{"runId": run_id}]


def test_a_fan_out_and_what_is_downstream_can_be_materialized_together(services: DagsterServices) -> None:
    cli_run(services, "research_report", "--input", "topic=tides", "--input", "max_questions=2")
    keys = [["research_report", name] for name in ("research", "draft")]
    run_id = launch(services, "research_report", keys, {})
    assert finished(services, run_id) == "SUCCESS", services.run_errors(run_id)
    steps = run_steps(services, run_id)
    assert {key.split(".")[0] for key in steps} == {"research_report__research", "research_report__draft"}, steps
    assert materialized_in(services, "research_report", run_id) == {"research", "draft"}


def test_a_changed_prompt_marks_its_asset_unsynced_and_then_what_is_downstream(services: DagsterServices) -> None:
    cli_run(services, "versioned")
    before = asset_nodes(services, "versioned")
    assert {name: n["staleStatus"] for name, n in before.items()} == dict.fromkeys(
        ("inputs", "outline", "expand", "polish", "aside"), "FRESH")
    folder = Path(services.env["MP_WORKFLOWS_PATH"])
    changed = {**CHAIN, "tasks": [dict(t, prompt="Expand in detail: {{ outline }}") if t["name"] == "expand" else t
                                  for t in CHAIN["tasks"]]}
    write_workflow(folder, changed)
    try:
        reloaded = services.graphql("""mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name)
            { __typename } }""", {"name": LOCATION})
        assert reloaded["reloadRepositoryLocation"]["__typename"] == "WorkspaceLocationEntry", reloaded
        after = wait_for(lambda: (lambda n: n if n["expand"]["opVersion"] != before["expand"]["opVersion"] else None)(
            asset_nodes(services, "versioned")), 60, "the reloaded code location", interval=1)
        # only the changed task's version moves, and Dagster marks that asset unsynced (a new code version)
        assert {n for n in after if after[n]["opVersion"] != before[n]["opVersion"]} == {"expand"}
        assert {name: n["staleStatus"] for name, n in after.items()} == {
            "inputs": "FRESH", "outline": "FRESH", "aside": "FRESH", "expand": "STALE", "polish": "FRESH"}
        # materializing it gives it a new data version, which marks what reads it unsynced (Dagster's lineage)
        run_id = launch(services, "versioned", [["versioned", "expand"]], {})
        assert finished(services, run_id) == "SUCCESS", services.run_errors(run_id)
        assert run_steps(services, run_id) == {task_step("versioned", "expand"): "SUCCESS"}
        again = asset_nodes(services, "versioned")
        assert {name: n["staleStatus"] for name, n in again.items()} == {
            "inputs": "FRESH", "outline": "FRESH", "aside": "FRESH", "expand": "FRESH", "polish": "STALE"}
    finally:
        write_workflow(folder, CHAIN)


def test_code_versions_follow_templates_model_and_parameters_not_inputs() -> None:
    spec = WorkflowSpec.model_validate(CHAIN)
    versions = {t.name: task_code_version(spec, t) for t in spec.all_tasks()}
    assert len(set(versions.values())) == 4 and all(re.fullmatch(r"[0-9a-f]{16}", v) for v in versions.values())
    assert template_sources(spec, spec.tasks[1]) == ["Expand: {{ outline }}", ""]  # unrendered

    def changed(**fields: Any) -> dict[str, str]:
        other = WorkflowSpec.model_validate({**CHAIN, "tasks": [dict(t, **fields) if t["name"] == "expand" else t
                                                                for t in CHAIN["tasks"]]})
        return {t.name: task_code_version(other, t) for t in other.all_tasks()}

    for fields in ({"prompt": "Expand more: {{ outline }}"}, {"model": "gpt-4o"}, {"temperature": 0.7},
                   {"max_tokens": 50}, {"output": "json"}, {"system": "Be brief."}):
        moved = changed(**fields)
        assert {n for n in moved if moved[n] != versions[n]} == {"expand"}, fields
    assert changed(description="other words") == versions  # what does not reach the model keeps the version
    # the asset carries it: Dagster compares it with the version of the latest materialization
    built = definitions.build_definitions(LoadResult({"versioned": spec}, {}, [])).resolve_asset_graph()
    assert built.get(dg.AssetKey(["versioned", "expand"])).code_version == versions["expand"]


def test_a_subset_whose_upstream_was_never_materialized_says_what_to_do(tmp_path: Path) -> None:
    job = definitions.build_definitions(load_workflows()).resolve_job_def("research_report")
    subset = job.get_subset(asset_selection={dg.AssetKey(["research_report", "report"])})
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = subset.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "FileNotFoundError" not in message and "Traceback" not in message
    assert re.search(r"asset research_report/(draft|refine) has never been materialized", message), message
    assert "materialize it too" in message and "mp-pipelines run research_report" in message


def test_a_fan_out_shows_its_items_as_a_table_of_at_most_the_first_thousand() -> None:
    import pandas as pd

    rows = [{"index": i, "status": "success" if i % 2 else "failed", "output": f"answer {i}",
             "error": None if i % 2 else "HTTP 500", "prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.001}
            for i in range(TABLE_ROWS + 5)]
    metadata = fanout_metadata(pd.DataFrame(rows), {i: f"item {i}" for i in range(TABLE_ROWS + 5)})
    table = metadata["item_table"]
    assert isinstance(table, dg.TableMetadataValue) and len(table.records) == TABLE_ROWS
    assert [c.name for c in table.schema.columns] == ["index", "item", "status", "answer", "tokens", "cost_usd"]
    first, second = (r.data for r in table.records[:2])
    assert first == {"index": 0, "item": "item 0", "status": "failed", "answer": "HTTP 500", "tokens": 7,
                     "cost_usd": 0.001}
    assert second["answer"] == "answer 1"
    assert metadata["items_shown"] == f"{TABLE_ROWS:,} of {TABLE_ROWS + 5:,} (the first {TABLE_ROWS:,})"


def test_the_catalog_shows_a_materialized_task_asset_that_can_be_materialized_again(
        services: DagsterServices, tmp_path: Path) -> None:
    require_browser()  # before the work: skip or fail at once without a browser
    cli_run(services, "research_report", "--input", "topic=tides", "--input", "max_questions=2")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with ui_page() as page:
        page.goto(f"{services.url}/assets/research_report/draft")
        materialize = page.locator("button", has_text=re.compile(r"^\W*Materialize$"))
        materialize.first.wait_for()
        page.get_by_text("Latest materialization").first.wait_for()
        page.get_by_text(re.compile(r"^\d+ (seconds?|minutes?) ago$")).first.wait_for()  # this run's
        page.screenshot(path=str(shots / "asset.png"))
        assert materialize.first.is_enabled()
        assert page.get_by_text(re.compile("external", re.IGNORECASE)).count() == 0
        # the lineage view draws the asset with its status, and Materialize there is enabled too
        page.goto(f"{services.url}/assets/research_report/draft?view=lineage")
        page.locator("foreignObject", has_text="plan").first.wait_for()  # the graph is drawn (in a web worker)
        page.locator("foreignObject", has_text="report").first.wait_for()
        page.screenshot(path=str(shots / "lineage.png"))
        assert page.locator("button", has_text=re.compile(r"^\W*Materialize")).first.is_enabled()
    assert sorted(p.name for p in shots.iterdir()) == ["asset.png", "lineage.png"]


def test_the_checks_tab_shows_a_failed_blocking_check_and_the_downstream_asset_stays_unmaterialized(
        services: DagsterServices, tmp_path: Path) -> None:
    require_browser()  # before the work: skip or fail at once without a browser
    outcome = cli_run(services, "gated", exit_code=1)  # a failed run: exit code 1
    assert outcome["status"] == "failure", outcome
    (check,) = outcome["tasks"]["headline"]["checks"]
    assert (check["name"], check["passed"], check["severity"]) == ("starts_with_headline", False, "error")
    assert outcome["tasks"]["article"]["status"] in ("not_run", "skipped"), outcome["tasks"]
    assert materialized_in(services, "gated", outcome["run_id"]) == {"inputs", "headline"}  # not `article`
    steps = run_steps(services, outcome["run_id"])
    assert task_step("gated", "article") not in steps or steps[task_step("gated", "article")] != "SUCCESS", steps
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with ui_page() as page:
        page.goto(f"{services.url}/assets/gated/headline?view=checks")
        # the list of the asset's checks: ours, its latest execution failed
        listed = page.locator("a, button, div", has_text="starts_with_headline").filter(has_text="Failed")
        listed.last.wait_for()
        page.get_by_text("This is a blocking asset check").first.wait_for()
        page.get_by_text("failed: does not match '^Headline:'").first.wait_for()  # the result's description
        page.screenshot(path=str(shots / "checks.png"))
        assert page.get_by_text("Evaluation result").count() == 1
        assert page.get_by_text(re.compile(r"^(Passed|Succeeded)$")).count() == 0
        # the downstream asset: its latest (and only) materialization attempt failed in that run
        page.goto(f"{services.url}/assets/gated/article")
        page.get_by_text("Latest materialization").first.wait_for()
        page.get_by_text("Failed in").first.wait_for()
        page.get_by_text(outcome["run_id"][:8]).first.wait_for()
        page.screenshot(path=str(shots / "downstream.png"))
    assert sorted(p.name for p in shots.iterdir()) == ["checks.png", "downstream.png"]
