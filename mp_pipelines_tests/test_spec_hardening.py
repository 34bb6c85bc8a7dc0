"""Hardening of spec/: long chains and cycles, the task-count limit, bounded rendering, names every layer
accepts, and YAML merge keys."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from mp_pipelines.calls.deadline import TaskTimeout
from mp_pipelines.cli.show import render_workflow
from mp_pipelines.spec import graph, validate
from mp_pipelines.spec.loader import WorkflowValidationError, load_workflow_file, load_workflows, parse_workflow
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec
from mp_pipelines.spec.templates import TemplateError, evaluate, render
from mp_pipelines.tasks.runner import build_request


def chain(count: int, *, name: str = "chain", cycle: bool = False) -> dict[str, Any]:
    """t0 reads t1, t1 reads t2, ...: the last task runs first; with `cycle`, the last reads t0."""
    tasks = [{"name": f"t{i}", "prompt": f"{{{{ t{i + 1} }}}}"} for i in range(count - 1)]
    tasks.append({"name": f"t{count - 1}", "prompt": "{{ t0 }}" if cycle else "start"})
    return {"name": name, "tasks": tasks}


def wide(count: int) -> dict[str, Any]:
    """One root and count - 1 tasks that each read it."""
    return {"name": "wide", "tasks": [{"name": "root", "prompt": "r"},
                                      *({"name": f"t{i}", "prompt": "{{ root }}"} for i in range(count - 1))]}


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(data, source="wf.yaml")
    return [f"{p.path}: {p.message}" for p in caught.value.problems]


# --- item 5: long chains, cycles and the task-count limit ---


def test_cycle_search_walks_a_chain_far_deeper_than_the_recursion_limit() -> None:
    deps = {f"t{i}": [f"t{i + 1}"] for i in range(99_999)} | {"t99999": []}
    assert graph.find_cycle(deps) is None
    deps["t99999"] = ["t0"]
    cycle = graph.find_cycle(deps)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 100_001


def test_a_chain_of_2000_tasks_validates_and_shows_in_run_order_quickly() -> None:
    started = time.perf_counter()
    spec = parse_workflow(chain(2000))
    order = graph.topological_order(spec)
    text = render_workflow(spec)
    assert time.perf_counter() - started < 15  # about 2 s on 2 cores; quadratic ordering took minutes
    assert order == [f"t{i}" for i in reversed(range(2000))]
    assert "  t0: text, default model  ← inputs, t1" in text
    # among steps that are ready, file order wins
    spec = parse_workflow({"name": "w", "tasks": [
        {"name": "c", "prompt": "{{ b }}"}, {"name": "a", "prompt": "p"}, {"name": "b", "prompt": "p"},
        {"name": "d", "prompt": "{{ a }}"}]})
    assert graph.topological_order(spec) == ["a", "b", "c", "d"]


def test_the_job_of_a_chain_of_2000_tasks_builds() -> None:
    from mp_pipelines.factory.job import build_job  # Dagster walks the chain recursively, one frame per op

    job = build_job(parse_workflow(chain(2000)))
    assert len(job.graph.node_defs) == 2001


def test_a_template_nested_too_deeply_is_one_problem() -> None:
    deep = "{{ " + "(" * 300 + "x" + ")" * 300 + " }}"
    data = {"name": "w", "tasks": [{"name": "a", "prompt": deep}, {"name": "b", "prompt": "{{ a }}"}]}
    assert problems_of(data) == ["tasks[0] (a).prompt: the template is nested too deeply (brackets, blocks or "
                                 "operators) to read"]


def test_a_cycle_through_a_long_chain_is_one_short_problem() -> None:
    (problem,) = problems_of(chain(1100, cycle=True))
    assert problem.startswith("tasks[0] (t0): dependency cycle t0 -> t1 -> t2 -> ")
    assert "(1,100 steps, each needing the next)" in problem
    assert len(problem) < 300


def test_more_tasks_than_the_limit_is_one_clear_problem() -> None:
    limit = validate.MAX_TASKS
    (problem,) = problems_of(wide(limit + 1))
    assert problem == (f"tasks: the workflow has {limit + 1:,} tasks, more than the {limit:,} a workflow "
                       "may have; split it into several workflows")


def test_loop_iterations_count_towards_the_task_limit() -> None:
    body = [{"name": f"b{i}", "prompt": "p"} for i in range(validate.MAX_TASKS // 10 + 1)]
    data = {"name": "w", "depth": 10, "tasks": [{"name": "l", "loop": {"max_iterations": 10}, "tasks": body}]}
    (problem,) = problems_of(data)
    assert f"the workflow has {10 * len(body):,} tasks (loop tasks counted once per iteration)" in problem


def test_a_pathological_file_is_one_problem_and_the_others_still_load(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(chain(1100, name="long")))
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump(wide(validate.MAX_TASKS + 1)))
    (tmp_path / "small.yaml").write_text("name: small\ntasks: [{name: a, prompt: p}]\n")
    result = load_workflows([tmp_path])
    assert sorted(result.specs) == ["long", "small"]
    assert [(Path(p.file).name, p.path) for p in result.problems] == [("huge.yaml", "tasks")]


# --- item 8: rendering is bounded in size and time ---


@pytest.mark.parametrize("expression", [
    "'a' * 10**8",
    "[1] * 10**8",
    "2 ** (10**8)",
    "'a'.center(10**8)",
    "'a'|center(10**8)",
    "'%0100000000d' % 1",
    "'{:>100000000}'.format(1)",
    "('a' * 10**4)|replace('a', 'a' * 10**4)",
    "(['a' * 10**4] * 10**4)|join",
    "''.join(['a' * 10**4] * 10**4)",
    "('a' * 10**4).translate({97: 'b' * 10**4})",
    "'a'.encode().center(10**8)",
    "'x'|indent(10**8, true)",
    "lipsum(10**6)",
])
def test_a_template_may_not_build_a_huge_value(expression: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match="more than the 4,000,000 a template may build"):
            render("{{ (" + expression + ")|length }}", {})
        with pytest.raises(TemplateError, match="more than the 4,000,000 a template may build"):
            evaluate("(" + expression + ")|length > 0", {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


def test_many_large_values_add_up_to_the_limit() -> None:
    with pytest.raises(TemplateError, match="values of more than 40,000,000 characters or items in all"):
        render("{{ range(100000)|map('center', 100000)|list|length }}", {})


def test_a_macro_that_repeats_its_argument_is_stopped_before_joining() -> None:
    template = "{% macro m(s) %}" + "{{ s }}" * 100 + "{% endmacro %}{{ m(m('a' * 1000))|length }}"
    with pytest.raises(TemplateError, match=r"joining text \(~, a macro or a block\) would make a value of 10,000,000"):
        render(template, {})


def test_a_structure_that_holds_its_parts_many_times_over_is_stopped() -> None:
    template = ("{% set ns = namespace(s=[1]) %}{% for i in range(22) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}"
                "{{ ns.s|tojson|length }}")
    with pytest.raises(TemplateError, match="a list, tuple or dict would make a value that holds its parts so many "
                                            "times over that written out it is 6,291,454 characters or items"):
        render(template, {})
    with pytest.raises(TemplateError, match="holds its parts so many times over"):
        render("{{ dict.fromkeys(range(100000), 'x' * 100000)|length }}", {})
    assert render("{{ [inputs.doc, inputs.doc]|length }}", {"inputs": {"doc": "d" * 3_000_000}}) == "2"  # held twice: fine


def test_tojson_indents_at_most_16() -> None:
    assert render("{{ [1]|tojson(indent=2) }}", {}) == "[\n  1\n]"
    with pytest.raises(TemplateError, match="tojson's indent must be a whole number from 0 to 16, not 1000"):
        render("{{ range(1000)|list|tojson(indent=1000) }}", {})


def test_values_that_double_in_a_loop_are_stopped() -> None:
    template = ("{% set ns = namespace(s='ab') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}{{ ns.s|length }}")
    with pytest.raises(TemplateError, match=r"joining text \(~, a macro or a block\) would make a value of 4,194,304"):
        render(template, {})


def test_rendering_stops_as_soon_as_the_prompt_is_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_PROMPT_CHARS", "1000")
    calls = []

    def chunk() -> str:
        calls.append(1)
        return "x" * 10

    with pytest.raises(TemplateError, match=r"rendered prompt is 1,0\d\d characters, more than the limit 1,000"):
        render("{% for i in range(100000) %}{{ chunk() }}{% endfor %}", {"chunk": chunk})
    assert len(calls) < 200


def test_rendering_stops_at_its_deadline() -> None:
    context = {"plan": ["a", "b"], "inputs": {"n": 3, "topic": "x"}}
    template = ("{% for q in plan %}{{ loop.index }}. {{ q|upper }}{{ '!' * inputs.n }} {% endfor %}"
                "{{ '%s-%d' % (inputs.topic, 2) }} {{ '{:>4}'.format(inputs.topic) }} {{ 2 ** 10 }} "
                "{{ [1, 2] + [3] }} {{ 'ab' ~ 'cd' }} {{ plan|join(', ') }} {{ 'a-b'.replace('-', '+') }}")
    expected = "1. A!!! 2. B!!! x-2    x 1024 [1, 2, 3] abcd a, b a+b"
    assert render(template, context, deadline=time.monotonic() + 5) == render(template, context) == expected
    started = time.monotonic()
    with pytest.raises(TemplateError, match="the template ran longer than the 0.3 s it had"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", {},
               deadline=started + 0.3)
    assert time.monotonic() - started < 3


def test_rendering_without_a_deadline_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from mp_pipelines.spec import sandbox

    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.3)
    started = time.monotonic()
    with pytest.raises(TemplateError, match="the template ran longer than the 0.3 s it had"):
        render("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}", {})
    assert time.monotonic() - started < 10


def test_a_task_whose_prompt_renders_past_its_timeout_times_out_while_rendering() -> None:
    spec = WorkflowSpec.model_validate({"name": "w", "tasks": [{"name": "a", "timeout": 0.3, "prompt":
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}]})
    task = spec.tasks[0]
    assert isinstance(task, TaskSpec)
    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="task a used up its timeout while rendering its prompt: the template ran"):
        build_request(spec, task, {}, default_model="m", timeout=None, label="a", deadline=started + 0.3)
    assert time.monotonic() - started < 3


# --- item 10: names every layer accepts ---


@pytest.mark.parametrize(("name", "reason"), [
    ("range", "is a Jinja global"),
    ("lipsum", "is a Jinja global"),
    ("namespace", "is a Jinja global"),
    ("self", "means something else in a template"),
    ("none", "means something else in a template"),
    ("true", "means something else in a template"),
    ("caller", "means something else in a template"),
])
def test_names_a_template_cannot_read_are_refused(name: str, reason: str) -> None:
    data = {"name": "w", "tasks": [{"name": name, "prompt": "p"}, {"name": "b", "prompt": "{{ " + name + " }}"}]}
    problems = problems_of(data)
    assert any(p.startswith(f"tasks[0] ({name}).name: task name {name!r} {reason}") for p in problems), problems


def test_long_names_are_refused_and_64_characters_are_fine() -> None:
    long = "a" * 65
    assert problems_of({"name": long, "tasks": [{"name": "t", "prompt": "p"}]}) == [
        f"name: workflow name '{'a' * 20}…' is 65 characters long; names may have at most 64"]
    assert problems_of({"name": "w", "tasks": [{"name": long, "prompt": "p"}]})[0].endswith(
        "is 65 characters long; names may have at most 64")
    assert problems_of({"name": "w", "inputs": {long: {}}, "tasks": [{"name": "t", "prompt": "p"}]})
    parse_workflow({"name": "w" * 64, "inputs": {"i" * 64: {}}, "tasks": [{"name": "t" * 64, "prompt": "p"}]})


def test_a_huge_name_is_refused_without_echoing_it() -> None:
    (problem,) = problems_of({"name": "w", "tasks": [{"name": "n" * 10_000, "prompt": "p"}]})
    assert len(problem) < 200


# --- item 11: YAML merge keys ---


MERGED = """
name: merged
tasks:
  - &base
    name: plan
    prompt: plan
    output: json
    retries: {max_retries: 1}
  - <<: *base
    name: research
    prompt: "{{ plan }}"
    timeout: 5
  - <<: [{timeout: 7, model: m}, *base]
    name: review
    prompt: "{{ research }}"
    retries: {max_retries: 2}
"""


def test_yaml_merge_keys_are_read_like_yaml_safe_load(tmp_path: Path) -> None:
    path = tmp_path / "merged.yaml"
    path.write_text(MERGED)
    spec = load_workflow_file(path)
    assert spec.model_dump() == WorkflowSpec.model_validate(yaml.safe_load(MERGED)).model_dump()
    plan, research, review = spec.all_tasks()
    assert (research.output, research.timeout, research.retries) == ("json", 5, plan.retries)
    assert (review.timeout, review.model, review.retries and review.retries.max_retries) == (7, "m", 2)


def test_a_key_repeated_next_to_a_merge_key_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("name: w\nbase: &b {prompt: p}\ntasks:\n  - <<: *b\n    name: a\n    name: b\n")
    with pytest.raises(WorkflowValidationError, match="key 'name' appears twice in one mapping"):
        load_workflow_file(path)


def test_merge_keys_cannot_blow_up_a_small_file(tmp_path: Path) -> None:
    lines = ["name: w", "l0: &l0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9, j: 10}"]
    lines += [f"l{n}: &l{n} {{<<: [{', '.join([f'*l{n - 1}'] * 10)}]}}" for n in range(1, 12)]
    lines.append("tasks: [{name: a, prompt: p}]")
    path = tmp_path / "w.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(WorkflowValidationError, match="unknown key 'l0'"):
        load_workflow_file(path)
    assert time.monotonic() - started < 5


LOAD_DEEP = """
import sys
from mp_pipelines import definitions
loaded = definitions.defs()  # what `dagster definitions validate`, the webserver and the daemon load
jobs = {job.name: job for job in loaded.resolve_all_job_defs()}  # resolved already: no new recursion here
step_job = definitions.get_job("chain")  # what a run or step process rebuilds
print(len(jobs["chain"].graph.node_defs), len(step_job.graph.node_defs), sys.getrecursionlimit())
"""


def test_a_chain_of_2000_tasks_loads_with_the_code_location_and_in_a_step_process(tmp_path: Path) -> None:
    """Dagster resolves asset jobs lazily and recursively; a large workflow's job is resolved when the code location
    loads, with room to recurse, so no later caller (Dagster's own) meets the recursion limit."""
    import os
    import subprocess
    import sys

    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(chain(2000)))
    env = {**os.environ, "MP_WORKFLOWS_PATH": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", LOAD_DEEP], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2001", "2001", "1000"]  # every op; the process's limit restored
