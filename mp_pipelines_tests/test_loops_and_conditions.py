"""Depth (unrolled loops with early stop) and `when:` conditions, against a scripted loopback endpoint.

The loopback server answers from a script in request order; these workflows are chains, so the
order of requests is fixed and each scripted answer reaches the task the test means.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from mp_pipelines.cli.reporting import step_states
from mp_pipelines.factory.names import body_step
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import materializations, run_file, write_workflow

LOOP = """
name: loop_check
depth: 3
tasks:
  - name: draft
    prompt: "Write a draft about {{ inputs.topic }}"
  - name: polish
    loop: {until: check.done}
    tasks:
      - name: check
        prompt: >-
          Round {{ loop.iteration }} of {{ loop.max_iterations }}:
          check {{ loop.previous.fix if loop.previous else draft }}
        output: json
        output_schema: {type: object, properties: {done: {type: boolean}}, required: [done]}
      - name: fix
        prompt: "Fix this: {{ loop.previous.fix if loop.previous else draft }}"
  - name: final
    prompt: "Final version: {{ polish.fix | default(draft) }}"
inputs:
  topic: {type: string, default: tides}
"""


def prompts(server: RunningServer) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in server.requests]


def test_loop_stops_early_when_until_holds(openai_env: RunningServer, instance: dg.DagsterInstance,
                                          tmp_path: Path) -> None:
    (openai_env.faults.add(content="DRAFT-0").add(content='{"done": false}').add(content="FIX-1")
     .add(content='{"done": true}').add(content="FINAL"))
    outcome = run_file(write_workflow(tmp_path, LOOP), {}, instance)
    assert outcome.success, outcome.as_text()
    sent = prompts(openai_env)
    assert len(sent) == 5  # draft, check 1, fix 1, check 2, final: no fix 2, no round 3
    assert sent[1] == "Round 1 of 3: check DRAFT-0"
    assert sent[3] == "Round 2 of 3: check FIX-1"
    assert sent[4] == "Final version: FIX-1"
    assert outcome.tasks["polish"]["output"] == {"check": {"done": True}, "fix": "FIX-1"}
    assert outcome.tasks["final"]["output"] == "FINAL"
    states = step_states(instance, outcome.run_id)
    assert states[body_step("loop_check", "polish", "check", 2)].status == "success"
    later = [body_step("loop_check", "polish", t, i) for t, i in (("fix", 2), ("check", 3), ("fix", 3))]
    assert {states[k].status for k in later} == {"skipped"}
    loop_event = next(e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "polish")
    assert loop_event.metadata["iterations"].value == 2
    assert loop_event.metadata["stopped_early"].value is True


def test_loop_runs_at_most_depth_iterations(openai_env: RunningServer, instance: dg.DagsterInstance,
                                            tmp_path: Path) -> None:
    openai_env.faults.add(content="D")
    for round_ in (1, 2, 3):
        openai_env.faults.add(content='{"done": false}').add(content=f"F{round_}")
    openai_env.faults.add(content="END")
    outcome = run_file(write_workflow(tmp_path, LOOP), {}, instance)
    assert outcome.success, outcome.as_text()
    sent = prompts(openai_env)
    assert len(sent) == 1 + 2 * 3 + 1
    assert sent[-1] == "Final version: F3"
    assert outcome.tasks["polish"]["output"]["fix"] == "F3"
    loop_event = next(e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "polish")
    assert loop_event.metadata["iterations"].value == 3 and loop_event.metadata["stopped_early"].value is False


def test_loop_max_iterations_below_depth(openai_env: RunningServer, instance: dg.DagsterInstance,
                                         tmp_path: Path) -> None:
    path = write_workflow(tmp_path, LOOP.replace("loop: {until: check.done}", "loop: {until: check.done, max_iterations: 1}"))
    openai_env.faults.add(content="D").add(content='{"done": false}').add(content="F1").add(content="END")
    outcome = run_file(path, {}, instance)
    assert outcome.success
    assert len(openai_env.requests) == 1 + 2 + 1
    assert prompts(openai_env)[-1] == "Final version: F1"
    assert body_step("loop_check", "polish", "check", 2) not in step_states(instance, outcome.run_id)  # not made


CONDITIONAL = """
name: triage
inputs:
  text: {type: string}
tasks:
  - name: classify
    prompt: "Classify: {{ inputs.text }}"
    output: json
    output_schema: {type: object, properties: {severity: {enum: [low, high]}}, required: [severity]}
  - name: escalate
    when: "classify.severity == 'high'"
    prompt: "Escalate: {{ inputs.text }}"
  - name: notify
    prompt: "Tell the team: {{ escalate }}"
"""


def test_when_false_skips_the_task_and_its_dependants(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                      tmp_path: Path) -> None:
    openai_env.faults.add(content='{"severity": "low"}')
    outcome = run_file(write_workflow(tmp_path, CONDITIONAL), {"text": "typo on page"}, instance)
    assert outcome.success, outcome.as_text()
    assert len(openai_env.requests) == 1  # neither escalate nor notify called the model
    assert outcome.tasks["escalate"]["status"] == "skipped"
    assert outcome.tasks["notify"]["status"] == "skipped"
    events = {e.asset_key.path[-1] for e in materializations(instance, outcome.run_id)}
    assert events == {"classify"}


def test_when_true_runs_the_task(openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(content='{"severity": "high"}').add(content="ESCALATED").add(content="TOLD")
    outcome = run_file(write_workflow(tmp_path, CONDITIONAL), {"text": "site down"}, instance)
    assert outcome.success
    assert outcome.tasks["escalate"]["output"] == "ESCALATED"
    assert prompts(openai_env)[2] == "Tell the team: ESCALATED"
    assert outcome.tasks["notify"]["status"] == "success"


def test_when_on_a_fan_out_filters_items(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, """
        name: filtered
        inputs:
          words: {type: list, default: [alpha, skip-me, gamma]}
        tasks:
          - name: shout
            for_each: inputs.words
            when: "item != 'skip-me'"
            prompt: "Shout {{ item }} (#{{ item_index }})"
    """)
    outcome = run_file(path, {}, instance)
    assert outcome.success, outcome.as_text()
    results = outcome.tasks["shout"]["output"]
    assert len(results) == 3 and results[1] is None
    assert "Shout alpha (#0)" in results[0] and "Shout gamma (#2)" in results[2]
    assert outcome.usage.calls == 2
    collect = next(e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "shout")
    assert collect.metadata["skipped_items"].value == 1


def test_fan_out_over_more_than_max_items_fails_clearly(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, {"name": "too_many", "max_items": 2,
                                     "inputs": {"words": {"type": "list", "default": ["a", "b", "c"]}},
                                     "tasks": [{"name": "echo", "for_each": "inputs.words", "prompt": "{{ item }}"}]})
    outcome = run_file(path, {}, instance)
    assert not outcome.success
    assert "3 items, more than the workflow's max_items (2)" in outcome.tasks["echo"]["error"]
    assert outcome.usage.calls == 0


def test_fan_out_over_a_non_list_fails_clearly(openai_env: RunningServer, instance: dg.DagsterInstance,
                                               tmp_path: Path) -> None:
    openai_env.faults.add(content=json.dumps(["only", "two"]))
    path = write_workflow(tmp_path, """
        name: nested
        tasks:
          - name: ideas
            prompt: "Two ideas"
            output: json
          - name: expand
            for_each: ideas
            prompt: "Expand {{ item }}"
    """)
    outcome = run_file(path, {}, instance)
    assert outcome.success
    assert [r.startswith("[simulated]") for r in outcome.tasks["expand"]["output"]] == [True, True]
    openai_env.reset()
    openai_env.faults.add(content='{"not": "a list"}')
    outcome = run_file(path, {}, instance)
    assert not outcome.success
    assert "needs a list, but it is a dict" in outcome.tasks["expand"]["error"]


def test_an_empty_fan_out_gives_an_empty_list_downstream(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, """
        name: empty_fanout
        inputs:
          words: {type: list, default: []}
        tasks:
          - name: echo
            for_each: inputs.words
            prompt: "Echo {{ item }}"
          - name: summary
            prompt: "Summarize {{ echo | length }} echoes"
    """)
    outcome = run_file(path, {}, instance)
    assert outcome.success, outcome.as_text()
    assert outcome.tasks["echo"] == {**outcome.tasks["echo"], "status": "success", "output": []}
    assert "Summarize 0 echoes" in outcome.tasks["summary"]["output"]
