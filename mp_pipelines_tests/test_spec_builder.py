"""Tests of spec/builder.py: the builder and YAML describe the same specs, both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mp_pipelines.spec.builder import Task, WorkflowBuilder
from mp_pipelines.spec.loader import WorkflowValidationError, load_workflow_file, parse_workflow
from mp_pipelines.spec.models import LoopSpec, RetrySpec, TaskSpec, WorkflowSpec

SPECS = Path(__file__).parent / "data" / "specs"
CRITIQUE = 'Critique {{ loop.previous.revise if loop.previous else draft }}; reply {"done": bool, "notes": str}.'
CRITIQUE_SCHEMA = {"type": "object", "properties": {"done": {"type": "boolean"}, "notes": {"type": "string"}},
                   "required": ["done", "notes"]}
DRAFT = (
    "Write a report on {{ inputs.topic }} from these answers:\n"
    "{% for answer in research %}- {{ answer }}\n{% endfor %}\n"
)


def research_report() -> WorkflowBuilder:
    """The builder twin of data/specs/research_report.yaml."""
    return (
        WorkflowBuilder("research_report",
                        description="Plan questions about a topic, answer each, then critique and revise a report.")
        .input("topic", "string", description="What to research")
        .input("max_questions", "integer", default=5)
        .defaults(model="gpt-4o-mini", temperature=0.2)
        .breadth(8).depth(3).max_items(1000)
        .task("plan", "List {{ inputs.max_questions }} questions about {{ inputs.topic }} as a JSON array of strings.",
              output="json", output_schema={"type": "array", "items": {"type": "string"}})
        .task("research", "Answer: {{ item }}", for_each="plan",
              retries=RetrySpec(max_retries=3, delay=1, backoff="exponential"), timeout=60)
        .task("draft", DRAFT)
        .loop("refine", until="critique.done", max_iterations=2, tasks=[
            Task("critique", CRITIQUE, output="json", output_schema=CRITIQUE_SCHEMA),
            Task("revise", "Revise {{ loop.previous.revise if loop.previous else draft }} using {{ critique.notes }}."),
        ])
        .schedule("0 6 * * *")
    )


def test_builder_equals_the_yaml_file() -> None:
    built = research_report().build()
    assert built == load_workflow_file(SPECS / "research_report.yaml")
    research = built.step("research")
    assert isinstance(research, TaskSpec)
    assert research.retries == RetrySpec(max_retries=3, delay=1.0, backoff="exponential")
    assert isinstance(built.step("refine"), LoopSpec) and built.schedule is not None and not built.schedule.enabled


@pytest.mark.parametrize("make", [lambda: research_report().build(),
                                  lambda: load_workflow_file(SPECS / "research_report.yaml")])
def test_to_yaml_loads_back_to_an_equal_spec(make: object) -> None:
    spec = make()  # type: ignore[operator]
    text = spec.to_yaml()
    again = parse_workflow(yaml.safe_load(text))
    assert again == spec and again.to_yaml() == text


def test_to_dict_is_plain_yaml_data() -> None:
    data = research_report().to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert data["tasks"][1]["retries"] == {"max_retries": 3, "delay": 1.0, "backoff": "exponential"}


def test_loop_accepts_task_specs_and_mappings() -> None:
    spec = (WorkflowBuilder("w")
            .task("start", "Go")
            .loop("l", [TaskSpec(name="a", prompt="{{ start }}"), {"name": "b", "prompt": "{{ a }}"}],
                  depends_on=["start"])
            .build())
    loop = spec.step("l")
    assert isinstance(loop, LoopSpec) and [task.name for task in loop.tasks] == ["a", "b"]
    assert loop.depends_on == ["start"] and loop.loop.max_iterations is None


def test_builder_mistakes_raise_the_same_error_as_yaml() -> None:
    builder = (WorkflowBuilder("w")
               .input("topic")
               .task("plan", "About {{ inputs.topik }}", depend_on=["x"])
               .task("answer", "{{ item }}", for_each="plan"))
    with pytest.raises(WorkflowValidationError) as caught:
        builder.build()
    problems = caught.value.problems  # structural errors first, then what the later checks find in the rest
    assert {p.file for p in problems} == {"WorkflowBuilder('w')"}
    assert [p.path for p in problems] == ["tasks[0] (plan).depend_on", "tasks[0] (plan).prompt",
                                          "tasks[1] (answer).for_each"]
    with pytest.raises(WorkflowValidationError) as caught:
        WorkflowBuilder("w").input("topic").task("plan", "About {{ inputs.topik }}").build()
    assert [p.path for p in caught.value.problems] == ["tasks[0] (plan).prompt"]


def test_schedule_and_tags() -> None:
    spec = (WorkflowBuilder("w", tags={"team": "research"})
            .input("topic")
            .task("a", "{{ inputs.topic }}")
            .tag("tier", "nightly")
            .schedule("0 6 * * *", timezone="Europe/Paris", enabled=True, inputs={"topic": "tides"})
            .build())
    assert spec.tags == {"team": "research", "tier": "nightly"}
    assert spec.schedule is not None and spec.schedule.enabled and spec.schedule.inputs == {"topic": "tides"}
    assert isinstance(spec, WorkflowSpec)
    with pytest.raises(WorkflowValidationError, match="input 'topic' has no default"):
        WorkflowBuilder("w").input("topic").task("a", "{{ inputs.topic }}").schedule("0 6 * * *", enabled=True).build()
