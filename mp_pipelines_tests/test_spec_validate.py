"""Tests of spec/validate.py (cross-task checks) and spec/graph.py (dependencies between steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mp_pipelines.spec import graph
from mp_pipelines.spec.loader import Problem, WorkflowValidationError, load_workflow_file, parse_workflow
from mp_pipelines.spec.models import LoopSpec, WorkflowSpec

SPECS = Path(__file__).parent / "data" / "specs"


def t(name: str, prompt: str = "p", **fields: Any) -> dict[str, Any]:
    return {"name": name, "prompt": prompt, **fields}


def loop(name: str, *tasks: dict[str, Any], depends_on: tuple[str, ...] = (), **control: Any) -> dict[str, Any]:
    return {"name": name, "depends_on": list(depends_on), "loop": control, "tasks": list(tasks)}


def wf(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "w", "inputs": {"topic": {"type": "string"}, "items": {"type": "list"}}, **fields,
            "tasks": list(tasks)}


def problems_of(data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(data, source="wf.yaml")
    return caught.value.problems


JSON_LIST = {"output": "json", "output_schema": {"type": "array"}}
CRITIQUE_SCHEMA = {"type": "object", "properties": {"done": {"type": "boolean"}, "notes": {"type": "string"}},
                   "required": ["done", "notes"]}
REFINE = loop("refine", t("critique", "{{ draft }}", output="json", output_schema=CRITIQUE_SCHEMA),
              t("revise", "{{ critique.notes }}"))


@pytest.mark.parametrize(
    ("tasks", "path", "words"),
    [
        # names
        ([t("a"), t("a")], "tasks[1] (a).name", ["'a' is already used by tasks[0] (a)", "its own name"]),
        ([t("a"), loop("l", t("a"))], "tasks[1] (l).tasks[0] (a).name", ["already used"]),
        # depends_on
        ([t("plan"), t("b", depends_on=["plann"])], "tasks[1] (b).depends_on[0]",
         ["unknown step 'plann'", "known steps: plan", "did you mean 'plan'?"]),
        ([t("draft"), REFINE, t("c", depends_on=["critique"])], "tasks[2] (c).depends_on[0]",
         ["inside loop 'refine'", "depend on the loop 'refine'"]),
        ([loop("l", t("a", depends_on=["b"]), t("b"))], "tasks[0] (l).tasks[0] (a).depends_on[0]",
         ["later task of loop 'l'", "loop.previous.b"]),
        # for_each
        ([t("a", "{{ item }}", for_each="plan")], "tasks[0] (a).for_each", ["unknown source 'plan'", "inputs.<name>"]),
        ([t("a", "{{ item }}", for_each="inputs.nope")], "tasks[0] (a).for_each",
         ["inputs.nope is not a declared input", "declared inputs: items, topic"]),
        ([t("a", "{{ item }}", for_each="inputs.topic")], "tasks[0] (a).for_each",
         ["input 'topic' is a string", "type list or table"]),
        ([t("plan"), t("a", "{{ item }}", for_each="plan")], "tasks[1] (a).for_each",
         ["task 'plan' has output: text", "output: json"]),
        ([t("plan", output="json", output_schema={"type": "object"}), t("a", "{{ item }}", for_each="plan")],
         "tasks[1] (a).for_each", ["type 'object'", "type: array"]),
        ([t("draft"), REFINE, t("a", "{{ item }}", for_each="refine")], "tasks[2] (a).for_each",
         ["'refine' is a loop", "not a list"]),
        ([loop("l", t("a", "{{ item }}", for_each="inputs.items"))], "tasks[0] (l).tasks[0] (a).for_each",
         ["not supported inside loop 'l'"]),
        # templates
        ([t("a", "{% if x %}")], "tasks[0] (a).prompt", ["Jinja syntax error on line 1"]),
        ([t("a", "ok\n{{ inputs.topic }\n")], "tasks[0] (a).prompt", ["Jinja syntax error on line 2"]),
        ([t("plan"), t("b", "{{ plam }}")], "tasks[1] (b).prompt", ["unknown name 'plam'", "did you mean 'plan'?"]),
        ([t("a", "{{ inputs.topik }}")], "tasks[0] (a).prompt",
         ["inputs.topik is not a declared input", "did you mean 'topic'?"]),
        ([t("a", system="About {{ inputs.nope }}")], "tasks[0] (a).system", ["inputs.nope is not a declared input"]),
        ([t("a", when="item.ok")], "tasks[0] (a).when", ["'item' is only defined in a task with for_each"]),
        ([t("a", "{{ item_index }}")], "tasks[0] (a).prompt", ["'item_index' is only defined in a task with for_each"]),
        ([t("a", "{{ loop.iteration }}")], "tasks[0] (a).prompt", ["'loop' is only defined in the tasks of a loop"]),
        ([t("a", "{{ previous }}")], "tasks[0] (a).prompt", ["loop.previous.<task>"]),
        ([loop("l", t("a", "{{ b }}"), t("b"))], "tasks[0] (l).tasks[0] (a).prompt",
         ["'b' is a later task of loop 'l'", "loop.previous.b"]),
        ([loop("l", t("a", "{{ a }}"))], "tasks[0] (l).tasks[0] (a).prompt",
         ["'a' is this task itself", "loop.previous.a"]),
        ([loop("l", t("a", "{{ l.a }}"))], "tasks[0] (l).tasks[0] (a).prompt", ["the loop itself cannot be read"]),
        ([loop("l", t("a", "{{ loop.previous.z }}"))], "tasks[0] (l).tasks[0] (a).prompt",
         ["loop.previous.z", "not a task of loop 'l'"]),
        ([loop("l", t("a", "{{ loop.index }}"))], "tasks[0] (l).tasks[0] (a).prompt", ["loop.index is not defined"]),
        ([t("draft"), REFINE, t("c", "{{ critique }}")], "tasks[2] (c).prompt",
         ["'critique' is a task inside loop 'refine'", "refine.critique"]),
        ([t("draft"), REFINE, t("c", "{{ refine.critic }}")], "tasks[2] (c).prompt",
         ["loop 'refine' has no task 'critic'", "critique, revise"]),
        # loops
        ([loop("l", t("a"), max_iterations=5)], "tasks[0] (l).loop.max_iterations",
         ["max_iterations 5 is more than the workflow depth 3"]),
        ([loop("l", t("a"), until="a.done and")], "tasks[0] (l).loop.until", ["Jinja syntax error"]),
        ([loop("l", t("a"), until="b.done")], "tasks[0] (l).loop.until", ["unknown name 'b'"]),
        ([loop("l", t("a"), until="item")], "tasks[0] (l).loop.until", ["'item' is only defined"]),
    ],
)
def test_each_problem_has_a_path_and_a_reason(tasks: list[dict[str, Any]], path: str, words: list[str]) -> None:
    problems = problems_of(wf(*tasks))
    assert [p.path for p in problems] == [path], problems
    for word in words:
        assert word in problems[0].message


@pytest.mark.parametrize(
    ("tasks", "start", "cycle"),
    [
        ([t("a", depends_on=["c"]), t("b", "{{ a }}"), t("c", when="b")], "tasks[0] (a)", "a -> c -> b -> a"),
        ([t("a", "{{ item }}", for_each="b"), t("b", "{{ a }}", **JSON_LIST)], "tasks[0] (a)", "a -> b -> a"),
        ([t("x"), loop("l", t("a", "{{ m }}")), t("m", "{{ l.a }}")], "tasks[1] (l)", "l -> m -> l"),
    ],
)
def test_cycles_print_the_cycle(tasks: list[dict[str, Any]], start: str, cycle: str) -> None:
    [problem] = problems_of(wf(*tasks))
    assert problem.path == start and f"dependency cycle {cycle}" in problem.message and "loop:" in problem.message


def test_a_task_depending_on_itself() -> None:
    [problem] = problems_of(wf(t("a", depends_on=["a"])))
    assert problem.path == "tasks[0] (a)" and "'a' depends on itself" in problem.message


@pytest.mark.parametrize(
    ("schedule", "path", "words"),
    [
        ({"cron": "0 6 * * *", "inputs": {"topik": "x"}}, "schedule.inputs.topik",
         ["unknown input 'topik'", "did you mean 'topic'?"]),
        ({"cron": "0 6 * * *", "enabled": True, "inputs": {"items": ["a"]}}, "schedule.inputs",
         ["input 'topic' has no default", "enabled schedule must set it"]),
        ({"cron": "0 6 * * *", "inputs": {"items": {"a": 1}}}, "schedule.inputs.items", ["expects a list"]),
    ],
)
def test_schedule_inputs(schedule: dict[str, Any], path: str, words: list[str]) -> None:
    [problem] = problems_of(wf(t("a"), schedule=schedule))
    assert problem.path == path
    for word in words:
        assert word in problem.message


def test_defaults_system_may_read_only_inputs_and_workflow() -> None:
    [problem] = problems_of(wf(t("a"), defaults={"system": "{{ workflow.name }} {{ inputs.topic }} {{ a }}"}))
    assert problem.path == "defaults.system" and "only inputs and workflow" in problem.message


@pytest.mark.parametrize(
    "tasks",
    [
        [t("plan", **JSON_LIST), t("a", "{{ item }} {{ item_index }}", for_each="plan", when="item != 'skip'")],
        [t("plan", output="json"), t("a", "{{ item }}", for_each="plan"), t("b", "{{ item }}", for_each="a")],
        [t("a", "{{ item }}", for_each="inputs.items"), t("b", "{{ range(3) | list }} {{ workflow.name }} {{ a }}")],
        [t("draft"), REFINE, t("c", "{{ refine.revise }} {{ refine['critique'] }}")],
        [t("d"), loop("l", t("a", "{% for x in d %}{{ loop.index }}{% endfor %}{{ loop.previous.b | default('') }} {{ d }}"),
                      t("b", "{{ a }} {{ loop.iteration }} of {{ loop.max_iterations }}", depends_on=["a", "d"]),
                      until="b and loop.iteration > 1", max_iterations=3)],
        [loop("l", t("a"), until="inputs.topic == 'x'")],
    ],
)
def test_valid_references_pass(tasks: list[dict[str, Any]]) -> None:
    assert isinstance(parse_workflow(wf(*tasks, schedule={"cron": "0 6 * * *"})), WorkflowSpec)


def test_a_file_with_several_problems_reports_them_all() -> None:
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(SPECS / "several_problems.yaml")
    assert [p.path for p in caught.value.problems] == [
        "tasks[0] (plan).prompt", "tasks[1] (research).depends_on[0]", "tasks[1] (research).for_each",
        "tasks[2] (summary).prompt",
    ]
    assert str(caught.value).splitlines()[0] == f"4 problems in {SPECS / 'several_problems.yaml'}"


# --- graph ---------------------------------------------------------------------------------------


def unchecked(*tasks: dict[str, Any]) -> WorkflowSpec:
    """A spec that passed Pydantic only, so graph functions can meet cycles."""
    return WorkflowSpec.model_validate(wf(*tasks))


def test_dependencies_of_the_research_report() -> None:
    spec = load_workflow_file(SPECS / "research_report.yaml")
    assert graph.step_dependencies(spec) == {
        "plan": [], "research": ["plan"], "draft": ["research"], "refine": ["draft"]}
    refine = spec.step("refine")
    assert isinstance(refine, LoopSpec)
    assert graph.body_dependencies(refine, set(graph.step_names(spec))) == {
        "critique": (["draft"], []), "revise": (["draft"], ["critique"])}


def test_dependencies_come_from_every_field() -> None:
    spec = unchecked(t("a"), t("b"), t("c"), t("d"), t("e"), t("f"),
                     t("g", "{{ a }}", system="{{ b }}", when="c", depends_on=["d"], for_each="e"),
                     t("h", "{{ item }}", for_each="inputs.items"))
    deps = graph.step_dependencies(spec)
    assert deps["g"] == ["a", "b", "c", "d", "e"] and deps["h"] == []


def test_loop_dependencies_come_from_body_and_until_but_not_body_names() -> None:
    spec = unchecked(t("a"), t("b"), t("c"), t("d"),
                     loop("l", t("x", "{{ a }} {{ loop.previous.y }}", depends_on=["b"]), t("y", "{{ x }}"),
                          until="c.done and y", depends_on=("d",)))
    assert graph.step_dependencies(spec)["l"] == ["a", "b", "c", "d"]
    body = graph.body_dependencies(spec.tasks[4], {"a", "b", "c", "d", "l"})  # type: ignore[arg-type]
    assert body == {"x": (["a", "b"], []), "y": (["c"], ["x"])}  # `until` is checked after y, the last task it reads


def test_until_gate_is_the_last_body_task_until_reads() -> None:
    body = [t("a"), t("b"), t("c")]
    assert graph.until_gate(LoopSpec.model_validate(loop("l", *body, until="a.done"))) == 0
    assert graph.until_gate(LoopSpec.model_validate(loop("l", *body, until="b and a"))) == 1
    assert graph.until_gate(LoopSpec.model_validate(loop("l", *body, until="inputs.topic"))) == 2
    assert graph.until_gate(LoopSpec.model_validate(loop("l", *body))) == 2


def test_topological_order_keeps_file_order_among_ready_steps() -> None:
    spec = unchecked(t("x", "{{ z }}"), t("y"), t("z"), t("w", depends_on=["y"]))
    assert graph.topological_order(spec) == ["y", "z", "x", "w"]


def test_topological_order_refuses_a_cycle() -> None:
    with pytest.raises(ValueError, match="a -> b -> a"):
        graph.topological_order(unchecked(t("a", "{{ b }}"), t("b", "{{ a }}")))


def test_find_cycle() -> None:
    assert graph.find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert graph.find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert graph.find_cycle({"a": ["zz"], "b": ["b"]}) == ["b", "b"]


def test_for_each_source_and_template_refs() -> None:
    spec = unchecked(t("p", **JSON_LIST), t("a", for_each="p"), t("b", for_each="inputs.items"), t("c"))
    assert [graph.for_each_source(task) for task in spec.all_tasks()[1:]] == [("step", "p"), ("input", "items"), None]
    source = "{% for x in d %}{{ loop.index }}{% endfor %}{{ loop.previous.b }} {{ loop['iteration'] }}"
    refs = graph.template_refs(source)
    assert refs.names == {"d", "loop"}
    assert refs.attributes["loop"] == {"previous", "iteration"} and refs.previous == {"b"}
