"""Sub-workflows (`workflow:`, `inputs:`, `outputs:`): a nested graph when run once, the callee's tasks inside the
caller's shards when run per item, one budget for the whole run, and every problem said as file, field, reason.

The workflows are written to a temporary folder on MP_WORKFLOWS_PATH and run offline on the simulated model.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from mp_pipelines.cli.config import run_config
from mp_pipelines.cli.main import main
from mp_pipelines.cli.reporting import step_states
from mp_pipelines.cli.running import run_workflow
from mp_pipelines.factory.assets import build_assets
from mp_pipelines.factory.job import build_job
from mp_pipelines.factory.names import ITEM_RECORDS, collect_step
from mp_pipelines.spec.loader import load_workflow_file, load_workflows
from mp_pipelines.spec.subworkflows import MAX_CALL_DEPTH
from mp_pipelines_tests.workflow_helpers import materializations, run_file, write_workflow

SUMMARIZE = """
name: summarize_list
inputs:
  docs: {type: list}
  words: {type: integer, default: 20}
tasks:
  - name: each
    for_each: inputs.docs
    prompt: "Summarize {{ item }} in {{ inputs.words }} words"
  - name: overall
    prompt: "Combine {{ each | join(' | ') }}"
"""

OUTER = """
name: outer
inputs:
  topic: {type: string, default: tea}
tasks:
  - name: plan
    output: json
    output_schema: {type: array, items: {type: string}}
    prompt: "List 3 subtopics of {{ inputs.topic }} as a JSON array"
  - name: summaries
    workflow: summarize_list
    inputs: {docs: "{{ plan }}", words: 5}
  - name: report
    prompt: "Report: {{ summaries }}"
"""

BRIEF = """
name: brief
inputs:
  topic: {type: string}
outputs: {outline: outline, text: draft}
tasks:
  - name: outline
    prompt: "Outline {{ inputs.topic }}"
  - name: draft
    prompt: "Draft from {{ outline }}"
"""

PER_ITEM = """
name: per_item
inputs:
  topics: {type: list, default: [tea, coffee, cocoa]}
tasks:
  - name: briefs
    for_each: inputs.topics
    workflow: brief
    inputs: {topic: "{{ item }}"}
  - name: digest
    prompt: "Digest: {{ briefs | map(attribute='text') | join(' / ') }}"
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workflow folder on MP_WORKFLOWS_PATH."""
    path = tmp_path / "workflows"
    path.mkdir()
    monkeypatch.setenv("MP_WORKFLOWS_PATH", str(path))
    return path


def test_a_workflow_calling_a_fan_out_workflow_is_a_nested_graph_with_namespaced_assets(
        folder: Path, instance: dg.DagsterInstance) -> None:
    write_workflow(folder, SUMMARIZE)
    outer = write_workflow(folder, OUTER)
    spec = load_workflow_file(outer)
    node = build_job(spec).graph.node_named("outer__summaries")
    assert isinstance(node.definition, dg.GraphDefinition)  # a collapsible subgraph in the UI
    assert {n.name for n in node.definition.nodes} == {"inputs", "each", "overall", "call__result"}
    assert isinstance(node.definition.node_named("each").definition, dg.GraphDefinition)  # the callee's fan-out

    outcome = run_file(outer, {}, instance)
    assert outcome.success, outcome.as_text()
    plan = outcome.tasks["plan"]["output"]
    summary = outcome.tasks["summaries"]["output"]
    assert all(f"Summarize {topic} in 5 words" in summary for topic in plan)  # the callee's fan-out, per plan item
    assert summary.startswith("[simulated] Response to: Combine ")
    assert outcome.tasks["report"]["output"].startswith(f"[simulated] Response to: Report: {summary}")
    assert outcome.usage.calls == 1 + 3 + 1 + 1

    states = step_states(instance, outcome.run_id)
    assert {"outer__summaries.inputs", "outer__summaries.each.each__items", "outer__summaries.each.each[0]",
            "outer__summaries.each.each__collect", "outer__summaries.overall", "outer__summaries.call__result"} <= set(states)
    events = {tuple(e.asset_key.path): e for e in materializations(instance, outcome.run_id)}
    nested = ("outer", "summaries__summarize_list")
    assert {("outer", "plan"), (*nested, "each"), (*nested, "overall"), ("outer", "summaries"),
            ("outer", "report")} <= set(events)
    assert events[(*nested, "each")].metadata["items"].value == 3
    assert summary.startswith(events[("outer", "summaries")].metadata["preview"].value.rstrip("…"))
    assert events[(*nested, "overall")].metadata["calls"].value == 1

    lineage = {tuple(key.path): {tuple(d.path) for d in asset.asset_deps[key]}
               for asset in build_assets(spec) for key in asset.keys}
    assert lineage[(*nested, "each")] == {("outer", "inputs"), ("outer", "plan")}  # into the sub-workflow
    assert lineage[(*nested, "overall")] == {(*nested, "each")}
    assert lineage[("outer", "summaries")] == {(*nested, "overall")}  # out of it
    assert lineage[("outer", "report")] == {("outer", "inputs"), ("outer", "summaries")}


def test_a_workflow_run_per_item_runs_its_tasks_inside_the_callers_shards(
        folder: Path, instance: dg.DagsterInstance) -> None:
    write_workflow(folder, BRIEF)
    path = write_workflow(folder, PER_ITEM)
    job = dg.build_reconstructable_job("mp_pipelines.definitions", "get_job", reconstructable_args=("per_item", str(path)))
    with dg.execute_job(job, instance=instance, run_config=run_config({}, "in_process")) as result:
        assert result.success
        item_records = result.output_for_node(collect_step("per_item", "briefs"), ITEM_RECORDS)
        states = step_states(instance, result.run_id)
    briefs = list(item_records["output"])
    assert [b["outline"].split(" (#")[0] for b in briefs] == [f"[simulated] Response to: Outline {t}"
                                                             for t in ("tea", "coffee", "cocoa")]
    assert all(b["text"].startswith(f"[simulated] Response to: Draft from {b['outline']}") for b in briefs)
    steps = list(item_records["steps"])
    assert [s["outline"] for s in steps] == [b["outline"] for b in briefs]  # each callee task's answer, per item
    assert [s["draft"] for s in steps] == [b["text"] for b in briefs]
    assert list(item_records["calls"]) == [2, 2, 2]
    assert not any("outline" in key or "draft" in key for key in states)  # no graph per item: inside the shards
    assert "per_item__briefs.briefs[0]" in states


def test_a_fan_out_workflow_runs_per_item_inside_the_callers_shards(folder: Path, instance: dg.DagsterInstance) -> None:
    write_workflow(folder, SUMMARIZE)
    path = write_workflow(folder, """
        name: groups
        inputs:
          groups: {type: list, default: ['[\"a\", \"b\"]', '[\"c\"]']}
        tasks:
          - name: per_group
            for_each: inputs.groups
            workflow: summarize_list
            inputs: {docs: "{{ item }}"}
        """)
    outcome = run_file(path, {}, instance)
    assert outcome.success, outcome.as_text()
    first, second = outcome.tasks["per_group"]["output"]
    assert "Summarize a in 20 words" in first and "Summarize b in 20 words" in first and "Summarize c" not in first
    assert "Summarize c in 20 words" in second
    assert outcome.usage.calls == 3 + 2


def test_one_budget_holds_across_nested_tasks(folder: Path, instance: dg.DagsterInstance) -> None:
    write_workflow(folder, BRIEF)
    path = write_workflow(folder, PER_ITEM)
    spec = load_workflow_file(path)
    outcome = run_workflow(spec, {}, source=str(path), executor="in_process", instance=instance,
                           budget={"max_calls": 4})
    assert not outcome.success
    assert outcome.usage.calls == 4  # 6 nested calls wanted, the run's one account stopped at 4
    assert "budget" in (outcome.tasks["briefs"]["error"] or "") or "max_calls" in (outcome.tasks["briefs"]["error"] or "")
    assert outcome.tasks["digest"]["status"] in ("not_run", "skipped")

    write_workflow(folder, SUMMARIZE)
    outer = write_workflow(folder, OUTER)
    outcome = run_workflow(load_workflow_file(outer), {}, source=str(outer), executor="in_process", instance=instance,
                           budget={"max_calls": 3})
    assert not outcome.success and outcome.usage.calls == 3  # plan and two of the nested graph's items
    assert outcome.tasks["report"]["status"] in ("not_run", "skipped")


def _validate(folder: Path, *texts: str) -> tuple[int, str]:
    for text in texts:
        write_workflow(folder, text)
    result = CliRunner().invoke(main, ["validate", str(folder)])
    return result.exit_code, result.stdout


CALLER = """
name: calling
inputs:
  topics: {type: list, default: [a]}
  title: {type: string, default: t}
tasks:
  - name: call
    workflow: %s
    inputs: %s
"""


@pytest.mark.parametrize("callee, inputs, path, reason", [
    ("summarise_list", "{docs: [a]}", "tasks[0] (call).workflow",
     "unknown workflow 'summarise_list'; known workflows: calling, summarize_list; did you mean 'summarize_list'?"),
    ("summarize_list", "{docs: [a], words: many}", "tasks[0] (call).inputs.words",
     "input 'words' expects an integer: 'many' is not a whole number (the type workflow 'summarize_list'"),
    ("summarize_list", "{docs: '{{ inputs.title }}', words: '{{ inputs.topics }}'}", "tasks[0] (call).inputs.words",
     "{{ inputs.topics }} is a list, but input 'words' of workflow 'summarize_list'"),
    ("summarize_list", "{words: 3}", "tasks[0] (call).inputs",
     "workflow 'summarize_list' (%s/summarize_list.yaml) needs input 'docs' (list, no default)"),
    ("summarize_list", "{docs: [a], word: 3}", "tasks[0] (call).inputs.word",
     "workflow 'summarize_list' (%s/summarize_list.yaml) has no input 'word'; its inputs: docs, words; "
     "did you mean 'words'?"),
    ("calling", "{}", "tasks[0] (call).workflow", "workflow 'calling' runs itself"),
])
def test_call_problems_name_file_field_and_reason(folder: Path, callee: str, inputs: str, path: str,
                                                  reason: str) -> None:
    code, out = _validate(folder, SUMMARIZE, CALLER % (callee, inputs))
    assert code == 1, out
    assert f"error {folder}/calling.yaml: {path}: {reason.replace('%s', str(folder))}" in out
    assert "ok    summarize_list" in out


def test_indirect_recursion_names_the_cycle(folder: Path) -> None:
    code, out = _validate(folder, "name: a\ntasks: [{name: to_b, workflow: b}]\n",
                          "name: b\ntasks: [{name: to_c, workflow: c}]\n",
                          "name: c\ntasks: [{name: back, workflow: a}]\n")
    assert code == 1
    assert (f"error {folder}/a.yaml: tasks[0] (to_b).workflow: workflow 'a' runs itself through other workflows: "
            "a -> b -> c -> a (each step needs the next)") in out
    assert f"error {folder}/c.yaml: tasks[0] (back).workflow: workflow 'c' runs itself" in out
    assert "0 workflow(s) valid" in out


def test_several_sinks_without_outputs_and_bad_outputs(folder: Path) -> None:
    two = "name: two\ninputs: {x: {type: string}}\ntasks: [{name: p, prompt: '{{ inputs.x }}'}, {name: q, prompt: q}]\n"
    code, out = _validate(folder, two, "name: user\ntasks: [{name: run_two, workflow: two, inputs: {x: hi}}]\n",
                          "name: outs\noutputs: {main: nope}\ntasks: [{name: p, prompt: p}]\n")
    assert code == 1
    assert (f"error {folder}/user.yaml: tasks[0] (run_two).workflow: workflow 'two' ({folder}/two.yaml) has several "
            "final tasks (p, q) and no outputs:") in out
    assert f"error {folder}/outs.yaml: outputs.main: unknown step 'nope'" in out
    assert "ok    two" in out  # several sinks are fine for a workflow no one calls


def test_task_shape_problems(folder: Path) -> None:
    code, out = _validate(folder, SUMMARIZE, """
        name: shapes
        inputs: {docs: {type: list, default: [a]}}
        tasks:
          - {name: both, workflow: summarize_list, prompt: hi, inputs: {docs: [a]}}
          - {name: tuned, workflow: summarize_list, model: gpt-4o, inputs: {docs: [a]}}
          - {name: stray, prompt: hi, inputs: {docs: [a]}}
        """, """
        name: in_loop
        tasks:
          - name: polish
            loop: {max_iterations: 2}
            tasks: [{name: inner, workflow: summarize_list, inputs: {docs: [a]}}]
        """, """
        name: looped
        inputs: {x: {type: string, default: a}}
        tasks:
          - name: again
            loop: {max_iterations: 2}
            tasks: [{name: step, prompt: '{{ inputs.x }}'}]
        """, """
        name: per_item_loop
        inputs: {xs: {type: list, default: [a]}}
        tasks: [{name: each, for_each: inputs.xs, workflow: looped, inputs: {x: '{{ item }}'}}]
        """)
    assert code == 1
    assert "tasks[0] (both): the task has both prompt and workflow 'summarize_list'" in out
    assert "tasks[1] (tuned): model is set but the task runs workflow 'summarize_list'" in out
    assert "tasks[2] (stray): inputs is set but the task has no workflow" in out
    assert "in_loop.yaml: tasks[0] (polish).tasks[0] (inner).workflow: a task inside loop 'polish' cannot run a workflow" in out
    assert (f"error {folder}/per_item_loop.yaml: tasks[0] (each).for_each: task 'each' runs workflow 'looped' "
            f"({folder}/looped.yaml) once per item inside its own steps, which cannot run its loop 'again'") in out


def test_a_long_chain_of_calls_is_refused_without_recursion(folder: Path) -> None:
    count = 400
    for index in range(count):
        step = f"{{name: next, workflow: w{index + 1}}}" if index + 1 < count else "{name: last, prompt: done}"
        (folder / f"w{index}.yaml").write_text(f"name: w{index}\ntasks: [{step}]\n")
    loaded = load_workflows([folder])
    assert len(loaded.specs) == MAX_CALL_DEPTH  # the last MAX_CALL_DEPTH levels are deep enough to run
    problem = next(p for p in loaded.problems if p.file == str(folder / f"w{count - MAX_CALL_DEPTH - 1}.yaml"))
    assert problem.path == "tasks[0] (next).workflow"
    assert f"nest {MAX_CALL_DEPTH + 1} levels deep through 'w{count - MAX_CALL_DEPTH}'" in problem.message
    caller = next(p for p in loaded.problems if p.file == str(folder / "w0.yaml"))
    assert "workflow 'w1' cannot run" in caller.message


def test_a_callee_is_found_next_to_a_file_given_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MP_WORKFLOWS_PATH", raising=False)
    write_workflow(tmp_path, SUMMARIZE)
    spec = load_workflow_file(write_workflow(tmp_path, OUTER))
    assert spec.callee("summarize_list").name == "summarize_list"


def test_show_prints_nested_steps(folder: Path) -> None:
    write_workflow(folder, SUMMARIZE)
    write_workflow(folder, OUTER)
    result = CliRunner().invoke(main, ["show", "outer"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = lines.index("  summaries: runs workflow summarize_list with docs, words  ← inputs, plan")
    assert lines[start + 1].startswith("      each: text, default model, for_each inputs.docs")
    assert lines[start + 2] == "      overall: text, default model  ← inputs, each"
    assert lines[start + 3].startswith("  report: text")


ROWS = """
name: read_rows
inputs:
  rows: {type: table}
tasks:
  - name: each_row
    for_each: inputs.rows
    prompt: "Row: {{ item.text }}"
"""

PASS_PATH = """
name: pass_path
inputs:
  where: {type: string}
  go: {type: boolean, default: true}
tasks:
  - name: read
    workflow: read_rows
    when: inputs.go
    inputs: {rows: "{{ inputs.where }}"}
  - name: after
    prompt: "After: {{ read }}"
"""


def test_a_table_path_passed_to_a_callee_passes_the_input_path_checks(folder: Path, tmp_path: Path,
                                                                       instance: dg.DagsterInstance) -> None:
    write_workflow(folder, ROWS)
    path = write_workflow(folder, PASS_PATH)
    (folder / "rows.csv").write_text("text\nfirst\nsecond\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("text\nCANARY-secret\n")

    refused = run_file(path, {"where": str(outside / "secret.csv")}, instance)
    assert not refused.success
    assert "is outside the allowed input roots" in refused.tasks["read"]["error"]
    assert refused.usage.calls == 0  # nothing of it was read or sent

    ok = run_file(path, {"where": str(folder / "rows.csv")}, instance)
    assert ok.success, ok.as_text()
    rows = ok.tasks["read"]["output"]  # over a table: the rows with a result column
    assert [(r["text"], r["result"].split(" (#")[0]) for r in rows] == [
        ("first", "[simulated] Response to: Row: first"), ("second", "[simulated] Response to: Row: second")]


def test_a_call_whose_when_is_false_is_skipped_with_its_dependants(folder: Path, instance: dg.DagsterInstance) -> None:
    write_workflow(folder, ROWS)
    path = write_workflow(folder, PASS_PATH)
    outcome = run_file(path, {"where": "nowhere.csv", "go": False}, instance)
    assert outcome.success, outcome.as_text()
    assert outcome.tasks["read"]["status"] == "skipped" and outcome.tasks["after"]["status"] == "skipped"
    assert outcome.usage.calls == 0


def test_a_spec_made_in_code_finds_its_callee_in_the_workflow_folders(folder: Path,
                                                                      instance: dg.DagsterInstance) -> None:
    from mp_pipelines.cli.api import run_workflow as run_from_python
    from mp_pipelines.spec.loader import parse_workflow
    from mp_pipelines.spec.problems import WorkflowValidationError

    write_workflow(folder, BRIEF)
    spec = parse_workflow({"name": "in_code", "tasks": [{"name": "one", "workflow": "brief", "inputs": {"topic": "x"}}]})
    result = run_from_python(spec, instance=instance, executor="in_process")
    assert result["status"] == "success"
    assert result["tasks"]["one"]["output"]["outline"].startswith("[simulated] Response to: Outline x")
    with pytest.raises(WorkflowValidationError, match=r"tasks\[0\] \(one\)\.workflow: unknown workflow 'brf'"):
        run_from_python(parse_workflow({"name": "bad_call", "tasks": [{"name": "one", "workflow": "brf"}]}),
                        instance=instance)


def test_three_levels_with_a_loop_inside(folder: Path, instance: dg.DagsterInstance) -> None:
    write_workflow(folder, """
        name: polish
        inputs: {text: {type: string}}
        tasks:
          - {name: draft, prompt: "Draft {{ inputs.text }}"}
          - name: refine
            depends_on: [draft]
            loop: {max_iterations: 2}
            tasks: [{name: revise, prompt: "Revise {{ loop.previous.revise if loop.previous else draft }}"}]
        """)
    write_workflow(folder, """
        name: middle
        inputs: {topic: {type: string}}
        outputs: {final: polished}
        tasks:
          - {name: seed, prompt: "Seed {{ inputs.topic }}"}
          - {name: polished, workflow: polish, inputs: {text: "{{ seed }}"}}
        """)
    path = write_workflow(folder, """
        name: top
        tasks:
          - {name: mid, workflow: middle, inputs: {topic: tea}}
          - {name: wrap, prompt: "Wrap {{ mid.final.revise }}"}
        """)
    outcome = run_file(path, {}, instance)
    assert outcome.success, outcome.as_text()
    revised = outcome.tasks["mid"]["output"]["final"]["revise"]
    assert revised.startswith("[simulated] Response to: Revise [simulated] Response to: Revise [simulated] Response "
                              "to: Draft [simulated] Response to: Seed tea")
    assert outcome.tasks["wrap"]["output"].startswith(f"[simulated] Response to: Wrap {revised}")
    assert {"top__mid.seed", "top__mid.polished.draft", "top__mid.polished.refine.revise__2",
            "top__mid.polished.call__result", "top__mid.call__result"} <= set(step_states(instance, outcome.run_id))
    keys = {tuple(e.asset_key.path) for e in materializations(instance, outcome.run_id)}
    assert {("top", "mid"), ("top", "mid__middle", "seed"), ("top", "mid__middle", "polished"),
            ("top", "mid__middle", "polished__polish", "draft"), ("top", "mid__middle", "polished__polish", "revise"),
            ("top", "mid__middle", "polished__polish", "refine")} <= keys
