"""The generated Dagster definitions: ops, edges, retry policies, fan-out, run config, assets, schedules."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines.definitions import build_definitions
from mp_pipelines.definitions import defs as load_defs
from mp_pipelines.factory.job import build_job
from mp_pipelines.factory.schedules import build_schedule
from mp_pipelines.spec.builder import WorkflowBuilder
from mp_pipelines.spec.loader import LoadResult, load_workflow_file, load_workflows
from mp_pipelines_tests.workflow_helpers import fan_workflow, write_workflow

SHIPPED = ("research_report", "summarize_documents", "classify_tickets")


def upstream_nodes(job: dg.JobDefinition, node: str) -> set[str]:
    """Nodes feeding `node` (a step key without mapping: `w__t` or `w__t.local`), within the same graph."""
    graph, _, local = node.rpartition(".")
    graph_def = job.graph.node_named(graph).definition if graph else job.graph
    return {out.node_name for out in graph_def.dependency_structure.all_upstream_outputs_from_node(local)}


def node_def(job: dg.JobDefinition, node: str) -> dg.NodeDefinition:
    """The definition of `node`: a top-level node, or `graph.local` one level down."""
    graph, _, local = node.rpartition(".")
    return job.graph.node_named(graph).definition.node_named(local).definition if graph else (
        job.graph.node_named(node).definition)


def test_every_shipped_workflow_has_a_job_and_assets() -> None:
    for name in SHIPPED:
        job = load_defs().resolve_job_def(name)
        assert job.tags["mp_pipelines/workflow"] == name
        assert job.tags["mp_pipelines/provider"] == "simulated"
    keys = load_defs().resolve_asset_graph().get_all_asset_keys()
    assert dg.AssetKey(["research_report", "research"]) in keys
    assert dg.AssetKey(["classify_tickets", "classify"]) in keys
    assert dg.AssetKey(["summarize_documents", "overview"]) in keys


def test_research_report_graph_mirrors_the_workflow() -> None:
    job = load_defs().resolve_job_def("research_report")
    w = "research_report__"
    # one node per asset: the inputs, each task, the fan-out's graph and the loop's graph
    assert {node.name for node in job.graph.nodes} == {w + n for n in ("inputs", "plan", "research", "draft", "refine",
                                                                     "report")}
    assert upstream_nodes(job, w + "plan") == {w + "inputs"}
    assert upstream_nodes(job, w + "research") == {w + "inputs", w + "plan"}
    assert upstream_nodes(job, w + "draft") == {w + "inputs", w + "plan", w + "research"}
    assert upstream_nodes(job, w + "refine") == {w + "inputs", w + "draft"}
    assert upstream_nodes(job, w + "report") == {w + "inputs", w + "refine", w + "draft"}
    # the loop is unrolled inside its graph: depth 3 → three critique/revise pairs, then the loop's result
    loop = node_def(job, w + "refine")
    assert {node.name for node in loop.nodes} == {f"{t}__{i}" for t in ("critique", "revise") for i in (1, 2, 3)} | {
        "refine"}
    assert upstream_nodes(job, w + "refine.revise__1") == {"critique__1"}
    assert upstream_nodes(job, w + "refine.critique__2") == {"revise__1"}
    assert upstream_nodes(job, w + "refine.refine") == {"critique__1", "critique__2", "critique__3", "revise__3"}


def test_fan_out_is_a_dynamic_output_mapped_and_collected() -> None:
    job = load_defs().resolve_job_def("research_report")
    fan_out = "research_report__research"
    items_op = node_def(job, f"{fan_out}.research__items")
    assert items_op.output_defs[0].is_dynamic
    structure = node_def(job, fan_out).dependency_structure
    assert structure.is_dynamic_mapped("research")
    # The collector also gets every shard's items, to finish what an earlier attempt left (budget, resume).
    assert upstream_nodes(job, f"{fan_out}.research__collect") == {"research", "research__items"}
    assert not structure.is_dynamic_mapped("research__collect")  # collected: back to one step
    assert upstream_nodes(job, f"{fan_out}.research__publish") == {"research__collect"}
    assert node_def(job, f"{fan_out}.research").tags["mp_pipelines/fanout"] == "research_report.research"


def test_retries_become_retry_policies() -> None:
    job = load_defs().resolve_job_def("research_report")
    policy = node_def(job, "research_report__research.research").retry_policy
    assert policy == dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
    assert node_def(job, "research_report__plan").retry_policy.max_retries == 2
    assert node_def(job, "research_report__draft").retry_policy is None


def test_inputs_are_typed_run_config_with_defaults() -> None:
    job = load_defs().resolve_job_def("research_report")
    with pytest.raises(dg.DagsterInvalidConfigError, match="topic"):
        dg.validate_run_config(job, {"ops": {"inputs": {"config": {}}}})
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_questions"):
        dg.validate_run_config(job, {"ops": {"inputs": {"config": {"topic": "x", "max_questions": "five"}}}})
    resolved = dg.validate_run_config(job, {"ops": {"inputs": {"config": {"topic": "x"}}}})
    # `ops.inputs.config` reaches the inputs op, whose name is unique in the code location
    assert resolved["ops"]["research_report__inputs"]["config"] == {"topic": "x", "max_questions": 5,
                                                                     "audience": "a technical reader"}
    # the executor is selectable per run and defaults to the concurrent one; fan-outs stay within breadth
    breadth_limit = [{"key": "mp_pipelines/fanout", "value": {"applyLimitPerUniqueValue": True}, "limit": 8}]
    concurrent = resolved["execution"]["mp_pipelines_executor"]["concurrent"]
    assert concurrent["max_concurrent"] == 64 and concurrent["tag_concurrency_limits"] == breadth_limit
    chosen = dg.validate_run_config(job, {"ops": {"inputs": {"config": {"topic": "x"}}},
                                          "execution": {"config": {"multiprocess": {}}}})
    multiprocess = chosen["execution"]["mp_pipelines_executor"]["multiprocess"]
    assert multiprocess["max_concurrent"] == 8 and multiprocess["tag_concurrency_limits"] == breadth_limit
    assert multiprocess["start_method"] == {"forkserver": {}}
    in_process = dg.validate_run_config(job, {"ops": {"inputs": {"config": {"topic": "x"}}},
                                              "execution": {"config": {"in_process": {}}}})
    assert "in_process" in in_process["execution"]["mp_pipelines_executor"]


def test_a_list_input_is_checked_once_by_the_inputs_op(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Given in the run config as the Launchpad takes it: JSON or comma-separated text is a list; a mapping fails the
    inputs step with one sentence naming the input."""
    spec = load_workflow_file(write_workflow(tmp_path, fan_workflow("fan_text", ["x"], breadth=2)))
    job = build_job(spec)
    field = job.run_config_schema.config_type.fields["ops"].config_type.fields["inputs"]
    assert "A list" in field.config_type.fields["config"].config_type.fields["words"].description
    result = job.execute_in_process(run_config={"ops": {"inputs": {"config": {"words": "alpha, beta"}}}},
                                    instance=instance)
    assert result.output_for_node("fan_text__inputs") == {"words": ["alpha", "beta"]}
    refused = job.execute_in_process(run_config={"ops": {"inputs": {"config": {"words": {"a": 1}}}}},
                                     instance=instance, raise_on_error=False)
    assert not refused.success
    [failure] = [e for e in refused.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "input 'words' expects a list: got a dict" in failure.step_failure_data.error.message


def test_asset_lineage_mirrors_the_dag() -> None:
    graph = load_defs().resolve_asset_graph()

    def parents(*path: str) -> set[tuple[str, ...]]:  # the workflow inputs feed every step: left out here
        return {tuple(key.path) for key in graph.get(dg.AssetKey(list(path))).parent_keys} - {(path[0], "inputs")}

    assert parents("research_report", "plan") == set()
    assert parents("research_report", "research") == {("research_report", "plan")}
    assert parents("research_report", "draft") == {("research_report", "plan"), ("research_report", "research")}
    assert parents("research_report", "revise") == {("research_report", "critique"), ("research_report", "draft")}
    assert parents("research_report", "refine") == {("research_report", "critique"), ("research_report", "revise")}
    assert parents("research_report", "report") == {("research_report", "refine"), ("research_report", "draft")}
    assert parents("classify_tickets", "escalate") == {("classify_tickets", "classify")}
    assert graph.get(dg.AssetKey(["classify_tickets", "classify"])).group_name == "classify_tickets"


def test_schedule_becomes_a_stopped_schedule_with_its_inputs() -> None:
    schedule = load_defs().resolve_schedule_def("research_report_schedule")
    assert schedule.cron_schedule == "0 6 * * 1"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.build_schedule_context(scheduled_execution_time=None) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    assert request.run_config["ops"]["inputs"]["config"] == {"topic": "the state of open-source LLM serving"}
    job = load_defs().resolve_job_def("research_report")
    dg.validate_run_config(job, request.run_config)  # the scheduled config is complete


def test_enabled_schedule_is_running_by_default() -> None:
    spec = (WorkflowBuilder("nightly").input("topic", default="x").task("a", "say {{ inputs.topic }}")
            .schedule("30 2 * * *", enabled=True).build())
    schedule = build_schedule(spec, build_job(spec))
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.cron_schedule == "30 2 * * *"


def test_a_workflow_whose_job_cannot_be_built_does_not_break_the_others(caplog: pytest.LogCaptureFixture) -> None:
    good = (WorkflowBuilder("good").task("a", "hello").build())
    valid = WorkflowBuilder("looped").task("a", "hello").build()
    # model_copy skips validation: a fan-out over a task that does not exist cannot be wired
    broken = valid.model_copy(update={"tasks": [valid.tasks[0].model_copy(update={"for_each": "missing"})]})
    loaded = LoadResult({"good": good, "looped": broken}, {}, [])
    built = build_definitions(loaded)
    assert built.resolve_job_def("good").name == "good"
    with pytest.raises(Exception):
        built.resolve_job_def("looped")
    assert "looped" in caplog.text and "could not build job" in caplog.text


def test_shipped_workflows_load_without_problems() -> None:
    loaded = load_workflows()
    assert not loaded.problems, loaded.problems
    assert set(SHIPPED) <= set(loaded.specs)
