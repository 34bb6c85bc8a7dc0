"""Every shipped workflow end to end through Dagster with the simulated provider, checking real values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from mp_pipelines.cli.reporting import RunValues
from mp_pipelines.cli.running import run_config, run_workflow
from mp_pipelines.spec.loader import SHIPPED_WORKFLOWS_DIR, load_workflows
from mp_pipelines_tests.workflow_helpers import materializations

SPECS = load_workflows().specs
# Rows of the shipped tickets.csv whose simulated labels were checked (see data/tickets/README.md): the simulated
# model draws each enum value from an RNG seeded by the request, so a ticket's urgency follows from its subject and
# body alone. One file has urgent tickets (101 and 104), the other none, so each path of `escalate` runs every time.
PINNED_TICKETS = Path(__file__).parent / "data" / "tickets"
SOME_URGENT = PINNED_TICKETS / "some_urgent.csv"
NONE_URGENT = PINNED_TICKETS / "none_urgent.csv"
PINNED = ("the simulated labels of the pinned tickets changed (did the prompt, the request or the simulated model "
          "change?): pick rows again as data/tickets/README.md says")


def test_research_report_runs_end_to_end(instance: dg.DagsterInstance) -> None:
    outcome = run_workflow(SPECS["research_report"], {"topic": "solar power", "max_questions": 4},
                           executor="in_process", instance=instance)
    assert outcome.success, outcome.as_text()
    assert outcome.provider == "simulated"
    tasks = outcome.tasks
    plan = tasks["plan"]["output"]
    assert isinstance(plan, list) and len(plan) == 4  # the simulated model honours "List 4 …"
    research = tasks["research"]["output"]
    assert len(research) == 4
    assert len(set(research)) == 4
    assert all(answer.startswith("[simulated] Response to: Answer briefly and factually:") for answer in research)
    assert tasks["report"]["status"] == "success" and "[simulated]" in tasks["report"]["output"]
    assert tasks["refine"]["status"] == "success"
    assert tasks["refine"]["output"]["critique"] == tasks["critique"]["output"]
    # usage adds up: one call per task run, research once per item
    loop_calls = tasks["critique"]["usage"].calls + tasks["revise"]["usage"].calls
    assert loop_calls >= 1
    assert outcome.usage.calls == 1 + 4 + 1 + loop_calls + 1
    assert outcome.usage.prompt_tokens > 0 and outcome.usage.completion_tokens > 0

    events = materializations(instance, outcome.run_id)
    keys = {tuple(event.asset_key.path) for event in events}
    assert {("research_report", name) for name in ("plan", "research", "draft", "critique", "refine", "report")} <= keys
    plan_event = next(e for e in events if e.asset_key.path == ["research_report", "plan"])
    assert plan_event.metadata["provider"].value == "simulated"
    assert plan_event.metadata["model"].value == "gpt-4o-mini"
    assert plan_event.metadata["calls"].value == 1
    assert "answer item 1" in plan_event.metadata["preview"].value
    research_event = next(e for e in events if e.asset_key.path == ["research_report", "research"])
    assert research_event.metadata["items"].value == 4 and research_event.metadata["calls"].value == 4
    assert research_event.metadata["provider"].value == "simulated"
    assert research_event.metadata["latency_s"].value >= 0


def test_same_inputs_give_the_same_results_on_every_executor(instance: dg.DagsterInstance) -> None:
    inputs = {"topic": "tidal energy", "max_questions": 2}
    outputs = {}
    for executor in ("in_process", None, "multiprocess"):  # None: the job's own, the concurrent executor
        outcome = run_workflow(SPECS["research_report"], inputs, executor=executor, instance=instance)
        assert outcome.success, outcome.as_text()
        outputs[executor] = {name: task["output"] for name, task in outcome.tasks.items()}
        if executor is None:
            events = instance.all_logs(outcome.run_id)
            assert any("concurrent" in (e.message or "").lower() for e in events)
    assert outputs["in_process"] == outputs[None] == outputs["multiprocess"]


@dataclass
class ClassifyRun:
    """What a run of the shipped classify_tickets job left: the label frame and what `escalate` did."""

    run_id: str
    frame: object
    escalate_succeeded: bool  # the op ran; with `when` false it succeeds without an output
    escalate_outputs: int  # STEP_OUTPUT events of `escalate`: 1 when it wrote a note, 0 when skipped
    escalated: str | None  # the note
    assets: set[tuple[str, ...]]  # asset keys the run materialised


def run_classify_job(instance: dg.DagsterInstance, tickets: Path) -> ClassifyRun:
    """Run the shipped classify_tickets job (through mp_pipelines.definitions) on the table `tickets`."""
    job = dg.build_reconstructable_job("mp_pipelines.definitions", "get_job", reconstructable_args=("classify_tickets", None))
    with dg.execute_job(job, instance=instance, run_config=run_config({"tickets": str(tickets)}, "in_process")) as result:
        assert result.success
        escalate = "classify_tickets__escalate"  # the step of task escalate (factory/names.py)
        outputs = [e for e in result.events_for_node(escalate) if e.event_type_value == "STEP_OUTPUT"]
        spec = load_workflows().specs["classify_tickets"]
        with RunValues(result, instance) as values:
            return ClassifyRun(result.run_id, values.asset(spec, "classify"),
                               result.is_node_success(escalate), len(outputs),
                               values.asset(spec, "escalate") if outputs else None,
                               {tuple(e.asset_key.path) for e in materializations(instance, result.run_id)})


def assert_one_label_row_per_ticket(frame: object, tickets: Path) -> None:
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["id"]) == list(pd.read_csv(tickets)["id"])  # one row per input row, in order
    assert {"subject", "body", "category", "urgency", "summary", "item_status"} <= set(frame.columns)
    assert set(frame["category"]) <= {"billing", "bug", "feature_request", "account", "other"}
    assert set(frame["urgency"]) <= {"low", "medium", "high"}
    assert (frame["item_status"] == "success").all()


def test_classify_tickets_gives_a_dataframe_with_one_row_per_ticket(instance: dg.DagsterInstance,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Some ticket is urgent: the escalation runs, and its note is an asset."""
    monkeypatch.setenv("MP_INPUT_ROOTS", str(PINNED_TICKETS))  # a run as the webserver starts it: no local folder
    run = run_classify_job(instance, SOME_URGENT)
    frame = run.frame
    assert_one_label_row_per_ticket(frame, SOME_URGENT)
    assert list(frame.loc[frame["urgency"] == "high", "id"]) == [101, 104], PINNED
    assert run.escalate_succeeded and run.escalate_outputs == 1
    assert ("classify_tickets", "escalate") in run.assets and "[simulated]" in run.escalated


def test_classify_tickets_without_an_urgent_ticket_skips_the_escalation(instance: dg.DagsterInstance,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No ticket is urgent: `escalate` decides its `when` is false, calls no model and materialises nothing."""
    monkeypatch.setenv("MP_INPUT_ROOTS", str(PINNED_TICKETS))  # a run as the webserver starts it: no local folder
    run = run_classify_job(instance, NONE_URGENT)
    frame = run.frame
    assert_one_label_row_per_ticket(frame, NONE_URGENT)
    assert set(frame["urgency"]) <= {"low", "medium"}, PINNED
    assert ("classify_tickets", "classify") in run.assets
    assert run.escalate_succeeded and run.escalate_outputs == 0 and run.escalated is None
    assert ("classify_tickets", "escalate") not in run.assets
    logs = [e.user_message for e in instance.all_logs(run.run_id) if e.step_key == "classify_tickets__escalate"]
    assert any("escalate: skipped because `when:" in message for message in logs), logs


@pytest.mark.parametrize(("tickets", "urgent", "escalate"), [
    (SOME_URGENT, [True, False, False, True], "success"),
    (NONE_URGENT, [False, False, False, False], "skipped"),
], ids=["some_urgent", "none_urgent"])
def test_classify_tickets_summary_via_run_workflow(instance: dg.DagsterInstance, tickets: Path,
                                                   urgent: list[bool], escalate: str) -> None:
    outcome = run_workflow(SPECS["classify_tickets"], {"tickets": str(tickets)}, executor="in_process",
                           instance=instance)
    assert outcome.success
    labels = outcome.tasks["classify"]["output"]
    assert len(labels) == len(pd.read_csv(tickets))
    assert all(set(label) == {"category", "urgency", "summary"} for label in labels)
    assert [label["urgency"] == "high" for label in labels] == urgent, PINNED
    assert outcome.tasks["escalate"]["status"] == escalate
    assert outcome.usage.calls == len(labels) + (escalate == "success")  # the skipped escalation calls no model


def test_summarize_documents_over_the_shipped_folder(instance: dg.DagsterInstance) -> None:
    outcome = run_workflow(SPECS["summarize_documents"], {}, executor="in_process", instance=instance)
    assert outcome.success, outcome.as_text()
    documents = sorted(p.name for p in (SHIPPED_WORKFLOWS_DIR / "data" / "documents").iterdir())
    summaries = outcome.tasks["summarize"]["output"]
    assert len(summaries) == len(documents) == 4
    assert len(set(summaries)) == 4  # one distinct summary per document
    assert outcome.usage.calls == 5  # map 4 + reduce 1


def test_summarize_documents_over_a_jsonl_file(instance: dg.DagsterInstance, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_INPUT_ROOTS", str(tmp_path))
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"name": f"d{i}", "text": f"Document number {i} about topic {i}."})
                                for i in range(3)))
    outcome = run_workflow(SPECS["summarize_documents"], {"documents": str(source), "max_words": 10},
                           executor="in_process", instance=instance)
    assert outcome.success, outcome.as_text()
    assert len(outcome.tasks["summarize"]["output"]) == 3
    assert outcome.tasks["overview"]["status"] == "success"


def test_a_missing_table_fails_the_run_naming_the_file(instance: dg.DagsterInstance, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_INPUT_ROOTS", str(tmp_path))
    missing = tmp_path / "nope.csv"
    outcome = run_workflow(SPECS["classify_tickets"], {"tickets": str(missing)}, executor="in_process",
                           instance=instance)
    assert not outcome.success
    assert outcome.status == "failure"
    assert outcome.tasks["classify"]["status"] == "failed"
    assert str(missing) in outcome.tasks["classify"]["error"]
    assert outcome.tasks["escalate"]["status"] in ("skipped", "not_run")
    assert outcome.usage.calls == 0


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_shipped_workflow_runs(instance: dg.DagsterInstance, name: str) -> None:
    spec = SPECS[name]
    inputs = {k: "quantum sensors" for k, s in spec.inputs.items() if s.required}
    outcome = run_workflow(spec, inputs, executor="in_process", instance=instance)
    assert outcome.success, outcome.as_text()
    assert outcome.usage.calls >= len([t for t in spec.tasks if not getattr(t, "when", None)])


def test_fan_out_results_keep_input_order_under_concurrency(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    from mp_pipelines_tests.workflow_helpers import run_file, write_workflow

    words = [f"w{i:02d}" for i in range(12)]
    path = write_workflow(tmp_path, {"name": "ordered", "breadth": 4,
                                     "inputs": {"words": {"type": "list", "default": words}},
                                     "tasks": [{"name": "echo", "for_each": "inputs.words", "prompt": "Echo {{ item }}"}]})
    # executor=None: the job's own, concurrent executor, where items finish in any order
    outcome = run_file(path, {}, instance, executor=None)
    assert outcome.success, outcome.as_text()
    results = outcome.tasks["echo"]["output"]
    assert [f"Echo {w}" in r for w, r in zip(words, results)] == [True] * 12
