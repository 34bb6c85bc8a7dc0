"""The spec checker that knows the shape of each answer (spec/shapes.py, spec/reads.py), and `validate` listing the
problems of every layer of a file at once (spec/salvage.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mp_pipelines.cli.main import main
from mp_pipelines.spec.loader import Problem, WorkflowValidationError, load_workflows, parse_workflow
from mp_pipelines.spec.reads import template_reads
from mp_pipelines.spec.templates import render

CRITIQUE_SCHEMA = {"type": "object", "properties": {"done": {"type": "boolean"}, "issues": {"type": "array",
                   "items": {"type": "string"}}, "note": {"type": "string"}}, "required": ["done", "issues"]}


def t(name: str, prompt: str = "p", **fields: Any) -> dict[str, Any]:
    return {"name": name, "prompt": prompt, **fields}


def wf(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "w", "inputs": {"topic": {"type": "string"}, "items": {"type": "list"}}, **fields,
            "tasks": list(tasks)}


def refine(*, critique: dict[str, Any] | None = None, revise: str = "Fix {{ critique.issues }}",
           until: str = "critique.done") -> dict[str, Any]:
    crit = critique if critique is not None else {"output": "json", "output_schema": CRITIQUE_SCHEMA}
    return {"name": "refine", "loop": {"until": until, "max_iterations": 2},
            "tasks": [t("critique", "Review {{ loop.previous.revise if loop.previous else draft }}", **crit),
                      t("revise", revise)]}


def problems_of(data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(data, source="wf.yaml")
    return caught.value.problems


@pytest.mark.parametrize(
    ("tasks", "path", "words"),
    [
        # the README's old example: a JSON task without a schema read by attribute, in until and in a prompt
        ([t("draft"), refine(critique={"output": "json"}, revise="Fix it")], "tasks[1] (refine).loop.until",
         ["critique.done", "output: json but no output_schema", "e.g. output_schema: {type: object",
          "done: {type: boolean}", "required: [done]"]),
        # text answers have no attributes
        ([t("a"), t("b", "{{ a.summary }}")], "tasks[1] (b).prompt",
         ["a.summary", "task 'a' answers text", "no attribute 'summary'"]),
        # a property the schema does not have, and one it does not require
        ([t("draft"), refine(revise="{{ critique.isues }}")], "tasks[1] (refine).tasks[1] (revise).prompt",
         ["critique.isues", "no property 'isues'", "properties: done, issues, note"]),
        ([t("draft"), refine(revise="{{ critique.note }}")], "tasks[1] (refine).tasks[1] (revise).prompt",
         ["critique.note", "not required", "| default(...)", "is defined"]),
        # a fan-out is a list
        ([t("a", "{{ item }}", for_each="inputs.items"), t("b", "{{ a.result }}")], "tasks[1] (b).prompt",
         ["a.result", "fan-out", "list of item results", "a[index]"]),
        # an item of a JSON list read by attribute
        ([t("plan", output="json", output_schema={"type": "array", "items": {"type": "string"}}),
          t("b", "{{ item.text }}", for_each="plan")], "tasks[1] (b).prompt",
         ["item.text", "is a string here", "no attribute 'text'"]),
        # a for loop's variable stands for an element of what it iterates
        ([t("plan", output="json", output_schema={"type": "array", "items": {"type": "object", "properties":
                                                  {"q": {"type": "string"}}, "required": ["q"]}}),
          t("b", "{% for p in plan %}{{ p.question }}{% endfor %}")], "tasks[1] (b).prompt",
         ["plan[*].question", "no property 'question'"]),
        # loop.previous is none on the first round
        ([t("draft"), refine(revise="{{ loop.previous.revise }}")], "tasks[1] (refine).tasks[1] (revise).prompt",
         ["loop.previous.revise", "none on the first round", "if loop.previous else"]),
        # a loop's tasks after the until gate may not have run
        ([t("draft"), refine(), t("report", "{{ refine.revise }}")], "tasks[2] (report).prompt",
         ["refine.revise", "has not run when the loop stops", "| default(...)"]),
        # conditions are checked too
        ([t("a", output="json", output_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}}),
          t("b", when="a.ok")], "tasks[1] (b).when", ["a.ok", "not required"]),
    ],
)
def test_reads_are_checked_against_the_shape_of_each_answer(tasks: list[dict[str, Any]], path: str,
                                                              words: list[str]) -> None:
    problems = problems_of(wf(*tasks))
    assert [p.path for p in problems] == [path], problems
    assert problems[0].file == "wf.yaml"
    for word in words:
        assert word in problems[0].message, problems[0].message


@pytest.mark.parametrize(
    "tasks",
    [
        [t("draft"), refine(), t("report", "{{ refine.revise | default(draft) }} {{ refine.critique.done }}",
                                 when="refine.critique.done")],
        [t("draft"), refine(revise="{{ critique.note | default('') }} {% if critique.note is defined %}"
                                   "{{ critique.note }}{% endif %} {% for i in critique.issues %}{{ i }}{% endfor %}")],
        [t("a", output="json"), t("b", "{{ a }} {{ a[0] }} {{ a | tojson }} {{ a.x | default(1) }}")],
        [t("a", "{{ item }}", for_each="inputs.items"), t("b", "{{ a | length }} {{ a[0] }}")],
        [t("a", output="json", output_schema={"anyOf": [{"type": "object"}, {"type": "array"}]}), t("b", "{{ a.k }}")],
        [t("a"), t("b", "{{ a.upper() }} {{ a[:10] }}")],
    ],
)
def test_reads_that_hold_at_run_time_pass(tasks: list[dict[str, Any]]) -> None:
    parse_workflow(wf(*tasks))


def test_the_suggested_schema_lists_every_attribute_read_and_makes_the_file_valid() -> None:
    data = wf(t("draft"), refine(critique={"output": "json"}))
    problems = problems_of(data)
    assert {p.path for p in problems} == {"tasks[1] (refine).loop.until", "tasks[1] (refine).tasks[1] (revise).prompt"}
    suggested = problems[0].message.split("e.g. output_schema: ", 1)[1]
    schema = yaml.safe_load(suggested)
    # `until: critique.done` alone is a condition: a boolean; `Fix {{ critique.issues }}` prints it: a string
    assert schema == {"type": "object", "properties": {"done": {"type": "boolean"}, "issues": {"type": "string"}},
                      "required": ["done", "issues"]}
    data["tasks"][1]["tasks"][0]["output_schema"] = schema
    parse_workflow(data)  # the suggestion fixes it


def test_an_unguarded_read_that_validate_refuses_really_fails_when_rendered() -> None:
    """What the checker refuses is what the sandboxed renderer fails on (and the guarded form renders)."""
    context = {"loop": {"previous": None}, "draft": "D"}
    with pytest.raises(Exception, match="no attribute 'revise'"):
        render("{{ loop.previous.revise }}", context)
    assert render("{{ loop.previous.revise if loop.previous else draft }}", context) == "D"
    with pytest.raises(Exception, match="has no attribute 'done'"):
        render("{{ critique.done }}", {"critique": {"issues": []}})


def test_template_reads_follow_for_variables_and_see_guards() -> None:
    found = template_reads("{% for t in classify if t.urgency == 'high' %}{{ t.summary | default('') }}{% endfor %}"
                           "{{ loop.previous.x if loop.previous else y }}")
    texts = {(read.text, read.guarded) for read in found.reads}
    assert ("classify[*].urgency", False) in texts and ("classify[*].summary", True) in texts
    assert ("loop", ("previous",)) in found.tested


def test_every_shipped_workflow_passes() -> None:
    loaded = load_workflows()
    assert not loaded.problems and {"research_report", "classify_tickets", "summarize_documents"} <= set(loaded.specs)


ALL_LAYERS = """\
name: layered
inputs:
  n: {type: integr}
tasks:
  - name: a
    prompt: "{{ inputs.m }}"
    output: jsn
  - name: b
    prompt: "{{ c.done }} {{ d.x }} {% if %}"
    depends_on: [summarise, c]
    colour: red
  - name: c
    prompt: "{{ b }}"
    output: json
  - name: d
    prompt: text
"""


def test_validate_lists_every_layer_at_once(tmp_path: Path) -> None:
    path = tmp_path / "layered.yaml"
    path.write_text(ALL_LAYERS)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error ")]
    expected = [
        ("inputs.n.type", "got 'integr'"),                                   # types
        ("tasks[0] (a).output", "got 'jsn'"),
        ("tasks[1] (b).colour", "unknown key 'colour'"),                      # keys
        ("tasks[0] (a).prompt", "inputs.m is not a declared input"),         # references
        ("tasks[1] (b).depends_on[0]", "unknown step 'summarise'"),
        ("tasks[1] (b).prompt", "Jinja syntax error"),                       # templates
        ("tasks[", "dependency cycle"),                                      # cycles
    ]
    for where, what in expected:
        assert any(f"{path}: {where}" in line and what in line for line in lines), (where, what, result.output)
    assert "note " not in result.output


def test_answer_shapes_are_checked_while_other_layers_have_problems() -> None:
    problems = problems_of(wf(t("a", output="jsn"), t("b", "{{ c.done }}", depends_on=["summarise"]),
                              t("c", output="json")))
    paths = [(p.path, p.message.split(":")[0]) for p in problems]
    assert ("tasks[0] (a).output", "input should be 'text' or 'json' (got 'jsn')") in paths
    assert any(path == "tasks[1] (b).depends_on[0]" for path, _ in paths)
    assert any(path == "tasks[1] (b).prompt" and what == "c.done" for path, what in paths)


def test_a_task_whose_output_was_refused_gets_no_guessed_shape_problems() -> None:
    problems = problems_of(wf(t("a", output="jsn"), t("b", "{{ a.x }}"), t("c", "{{ item }}", for_each="a")))
    assert [p.path for p in problems] == ["tasks[0] (a).output"], problems


def test_where_later_checks_cannot_run_validate_says_so(tmp_path: Path) -> None:
    path = tmp_path / "stuck.yaml"
    path.write_text("name: stuck\ntasks:\n  - just text\n  - {name: b, prompt: '{{ nowhere }}'}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"error {path}: tasks[0]" in result.output
    assert f"note  {path}: references, cycles, templates and answer shapes were not checked because tasks.0 " \
           "is not a task or loop mapping" in result.output


def test_a_repeated_key_is_one_problem_among_the_others(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("name: twice\ntasks:\n  - name: a\n    prompt: 'x'\n    prompt: '{{ inputs.nope }}'\n"
                    "    output: jsn\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error ")]
    assert lines == [
        f"error {path}: line 5, column 5: invalid YAML: key 'prompt' appears twice in one mapping; the later value "
        "is used for the other checks",
        f"error {path}: tasks[0] (a).output: input should be 'text' or 'json' (got 'jsn')",
        f"error {path}: tasks[0] (a).prompt: inputs.nope is not a declared input; declared inputs: none",
    ]


def test_a_file_that_is_not_yaml_says_nothing_else_was_checked(tmp_path: Path) -> None:
    path = tmp_path / "cut.yaml"
    path.write_text("name: cut\ntasks: [\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1 and f"error {path}: line 3, column 1: invalid YAML" in result.output
    assert f"note  {path}: the file could not be read as YAML, so its fields, references and templates were not " \
           "checked" in result.output
