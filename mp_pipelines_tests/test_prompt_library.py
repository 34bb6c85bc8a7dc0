"""The prompt library: `{% include %}`, `{% import %}` and macros from prompts/ and MP_PROMPTS_PATH, sandboxed,
checked at load time with both files named, and part of what the response cache keys and code versions see."""

from __future__ import annotations

import os
import re
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from mp_pipelines.cli.main import main
from mp_pipelines.spec.library import MAX_INCLUDE_DEPTH, SHIPPED_LIBRARY, library_folders, library_sources
from mp_pipelines.spec.loader import SHIPPED_WORKFLOWS_DIR, WorkflowValidationError, load_workflow_file, load_workflows
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.templates import RenderTimeout, TemplateError, render
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import run_file

STYLE = """\
{% macro house_rules(audience, sentences=3) -%}
Write for {{ audience }} in at most {{ sentences }} sentences.
{%- endmacro %}
{% set tone = "plain" %}
"""


def workflow(folder: Path, prompt: str, *, system: str | None = None, name: str = "lib") -> Path:
    """A one-task workflow file in `folder` with `prompt` (and `defaults.system`), input `audience`."""
    lines = [f"name: {name}", "inputs:", "  audience: {type: string, default: engineers}"]
    lines += ["defaults:", "  temperature: 0"]  # answers at temperature 0 are cached
    if system is not None:
        lines += [f"  system: {system!r}"]
    lines += ["tasks:", "  - name: write", "    prompt: |", textwrap.indent(prompt, "      ")]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def library(folder: Path, files: dict[str, str]) -> Path:
    """Write `files` (name → text) into `folder`/prompts and return that folder."""
    root = folder / "prompts"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def rendered(spec: WorkflowSpec, source: str, **context: object) -> str:
    return render(source, {"inputs": {"audience": "engineers"}, "workflow": {"name": spec.name}, **context},
                  library=spec.prompt_library)


def problems(path: Path) -> list[str]:
    with pytest.raises(WorkflowValidationError) as caught:
        load_workflow_file(path)
    return [f"{p.path}: {p.message}" for p in caught.value.problems]


def test_include_import_and_macros_with_arguments_render(tmp_path: Path) -> None:
    library(tmp_path, {"style.j2": STYLE, "parts/header.j2": "Workflow {{ workflow.name }} for {{ inputs.audience }}."})
    path = workflow(tmp_path, '{% from "style.j2" import house_rules %}{% import "style.j2" as style -%}\n'
                    "{{ house_rules(inputs.audience, sentences=2) }} {{ house_rules('children') }} {{ style.tone }}",
                    system='{% include "parts/header.j2" %}')
    spec = load_workflow_file(path)
    assert spec.prompt_library == (str((tmp_path / "prompts").resolve()), str(SHIPPED_LIBRARY))
    assert rendered(spec, spec.tasks[0].prompt) == ("Write for engineers in at most 2 sentences. "
                                                    "Write for children in at most 3 sentences. plain")
    assert rendered(spec, spec.defaults.system) == "Workflow lib for engineers."


def test_mp_prompts_path_is_searched_after_the_workflows_own_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shared, other = tmp_path / "shared", tmp_path / "other"
    for folder, text in ((shared, "shared {{ x }}"), (other, "other")):
        folder.mkdir()
        (folder / "note.j2").write_text(text)
    (other / "only_other.j2").write_text("from the second folder")
    monkeypatch.setenv("MP_PROMPTS_PATH", os.pathsep.join([str(shared), str(other)]))
    (tmp_path / "wf").mkdir()
    path = workflow(tmp_path / "wf", '{% set x = 1 %}{% include "note.j2" %} / {% include "only_other.j2" %}')
    spec = load_workflow_file(path)
    assert spec.prompt_library == (str(tmp_path / "wf" / "prompts"), str(shared), str(other), str(SHIPPED_LIBRARY))
    assert rendered(spec, spec.tasks[0].prompt) == "shared 1 / from the second folder"
    library(tmp_path / "wf", {"note.j2": "own"})  # the workflow's own prompts/ folder comes first
    assert rendered(load_workflow_file(path), spec.tasks[0].prompt) == "own / from the second folder"
    # a spec with no file: MP_PROMPTS_PATH, then the shipped library
    assert library_folders(None) == (str(shared), str(other), str(SHIPPED_LIBRARY))


def test_every_way_out_of_the_library_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("the secret")
    root = library(tmp_path, {"ok.j2": "fine"})
    (root / "out.j2").symlink_to(outside)
    (root / "inside_link.j2").symlink_to(root / "ok.j2")  # a link that stays inside is fine
    (tmp_path / "elsewhere").mkdir()
    (root / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "x.j2").write_text("escaped")
    cases = {
        '{% include "../secret.txt" %}': "'..' is not allowed",
        '{% include "sub/../../secret.txt" %}': "'..' is not allowed",
        f'{{% include "{outside}" %}}': "is not a relative file name",
        '{% include "out.j2" %}': f"is a link to {outside}, outside the prompt library",
        '{% include "sub/x.j2" %}': "outside the prompt library",
        '{% set n = "ok.j2" %}{% include n %}': "include needs the file name as a quoted string",
    }
    for prompt, reason in cases.items():
        (found,) = problems(workflow(tmp_path, prompt))
        assert found.startswith("tasks[0] (write).prompt: line 1: include") and reason in found, (prompt, found)
    spec = load_workflow_file(workflow(tmp_path, '{% include "inside_link.j2" %}{% include "gone.j2" ignore missing %}'))
    assert rendered(spec, spec.tasks[0].prompt) == "fine"
    # rendering checks the same way (a spec built without validation, or a file changed since)
    for prompt, reason in cases.items():
        with pytest.raises(TemplateError, match=re.escape(reason)):
            render(prompt, {}, library=spec.prompt_library)


def test_a_library_file_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library(tmp_path, {"big.j2": "x" * 2000})
    monkeypatch.setenv("MP_MAX_PROMPT_FILE_BYTES", "1000")
    (found,) = problems(workflow(tmp_path, '{% include "big.j2" %}'))
    assert "prompt file 'big.j2'" in found and "2,000 bytes, more than the limit 1,000 (MP_MAX_PROMPT_FILE_BYTES)" in found
    monkeypatch.setenv("MP_MAX_PROMPT_FILE_BYTES", "5000")
    spec = load_workflow_file(workflow(tmp_path, '{% include "big.j2" %}'))
    assert rendered(spec, spec.tasks[0].prompt) == "x" * 2000


def test_include_cycles_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    chain = {f"n{i}.j2": f'{{% include "n{i + 1}.j2" %}}' for i in range(MAX_INCLUDE_DEPTH + 2)}
    library(tmp_path, {"a.j2": 'A{% include "b.j2" %}', "b.j2": '\nB{% include "a.j2" %}', "self.j2": '{% include "self.j2" %}',
                       **chain, f"n{MAX_INCLUDE_DEPTH + 2}.j2": "end"})
    (cycle,) = problems(workflow(tmp_path, '{% include "a.j2" %}'))
    assert "prompt file 'b.j2', line 2: include 'a.j2' makes a cycle (a.j2 → b.j2 → a.j2)" in cycle
    (itself,) = problems(workflow(tmp_path, '{% import "self.j2" as s %}'))
    assert "include 'self.j2' makes a cycle (self.j2 → self.j2)" in itself
    (deep,) = problems(workflow(tmp_path, '{% include "n0.j2" %}'))
    assert f"nests library files more than {MAX_INCLUDE_DEPTH} deep" in deep


def test_a_cycle_made_after_validation_stops_the_render(tmp_path: Path) -> None:
    root = library(tmp_path, {"a.j2": "A", "b.j2": "B"})
    spec = load_workflow_file(workflow(tmp_path, '{% include "a.j2" %}'))
    assert rendered(spec, spec.tasks[0].prompt) == "A"
    (root / "a.j2").write_text('A2{% include "b.j2" %}')
    (root / "b.j2").write_text('B2{% include "a.j2" %}')
    with pytest.raises(TemplateError, match=r"makes a cycle \(a.j2 → b.j2 → a.j2\)"):
        rendered(spec, spec.tasks[0].prompt)


def test_the_sandbox_and_the_render_deadline_hold_inside_library_files(tmp_path: Path) -> None:
    library(tmp_path, {
        "internals.j2": "{{ ''.__class__ }}",
        "huge.j2": "{% macro blow(n) %}{{ 'a' * n }}{% endmacro %}",
        "slow.j2": "{% macro spin() %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                   "{% endfor %}{% endmacro %}",
    })
    (internals,) = problems(workflow(tmp_path, '{% include "internals.j2" %}'))
    assert "prompt file 'internals.j2'" in internals and "'__class__' is a Python internal" in internals
    spec = load_workflow_file(workflow(tmp_path, '{% from "huge.j2" import blow %}{{ blow(10**9) }}'))
    with pytest.raises(TemplateError, match="more than the .* a template may build"):
        rendered(spec, spec.tasks[0].prompt)
    spec = load_workflow_file(workflow(tmp_path, '{% from "slow.j2" import spin %}{{ spin() }}'))
    started = time.monotonic()
    with pytest.raises(RenderTimeout):
        render(spec.tasks[0].prompt, {"inputs": {}}, library=spec.prompt_library, deadline=time.monotonic() + 0.3)
    assert time.monotonic() - started < 3


def test_validate_names_the_workflow_field_and_the_included_file_and_line(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    library(tmp_path, {"style.j2": STYLE, "broken.j2": "line one\nline two\n{{ oops( }}\n"})
    text = textwrap.dedent("""\
        name: broken_lib
        defaults:
          system: '{% include "nowhere.j2" %}'
        tasks:
          - name: first
            prompt: fine
          - name: second
            prompt: |
              hello
              {% from "style.j2" import house_rulez %}{{ house_rulez() }}
          - name: third
            prompt: '{% include "broken.j2" %}'
        """)
    path = tmp_path / "broken_lib.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 3, result.output
    missing, undefined, broken = lines
    assert missing.startswith(f"error {path}: defaults.system: line 1: include 'nowhere.j2': no file 'nowhere.j2' "
                              f"in the prompt library (folders: {tmp_path / 'prompts'}, {SHIPPED_LIBRARY})")
    assert undefined.startswith(f"error {path}: tasks[1] (second).prompt: line 2: prompt file 'style.j2' defines "
                                "no macro or variable 'house_rulez' (it defines house_rules, tone)")
    assert broken == (f"error {path}: tasks[2] (third).prompt: prompt file 'broken.j2' ({tmp_path / 'prompts' / 'broken.j2'}): "
                      "Jinja syntax error on line 3: unexpected '}', expected ')'")
    assert "Traceback" not in result.output
    # in a workflow folder the file is reported and the other workflows still load
    loaded = load_workflows([tmp_path])
    assert "broken_lib" not in loaded.specs and len(loaded.problems) == 3


def test_an_imported_name_read_through_its_alias_must_exist(tmp_path: Path) -> None:
    library(tmp_path, {"style.j2": STYLE})
    (found,) = problems(workflow(tmp_path, '{% import "style.j2" as s %}\n{{ s.house_rules("x") }} {{ s.missing }}'))
    assert found == ("tasks[0] (write).prompt: line 2: prompt file 'style.j2' defines no macro or variable 'missing' "
                     "(it defines house_rules, tone)")


def test_library_sources_lists_every_file_a_template_uses_transitively(tmp_path: Path) -> None:
    root = library(tmp_path, {"outer.j2": '{% include "inner/a.j2" %}{% from "style.j2" import house_rules %}',
                              "inner/a.j2": 'a{% include "style.j2" %}', "style.j2": STYLE, "unused.j2": "u"})
    spec = load_workflow_file(workflow(tmp_path, '{% include "outer.j2" %}'))
    sources = library_sources(spec, spec.tasks[0].prompt)
    assert [name for name, _ in sources] == ["outer.j2", "inner/a.j2", "style.j2"]
    assert dict(sources)["style.j2"] == STYLE
    assert library_sources(spec, "no includes {{ inputs.audience }}") == []
    (root / "style.j2").write_text(STYLE.replace("plain", "warm"))
    assert "warm" in dict(library_sources(spec, spec.tasks[0].prompt))["style.j2"]  # read again, not remembered


def test_editing_an_included_file_changes_the_cache_key(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                        tmp_path: Path) -> None:
    root = library(tmp_path, {"style.j2": STYLE})
    path = workflow(tmp_path, '{% from "style.j2" import house_rules %}{{ house_rules(inputs.audience) }} Describe owls.',
                    system='{% from "style.j2" import house_rules %}{{ house_rules("everyone", sentences=9) }}')
    first = run_file(path, {}, instance)
    assert first.success and first.usage.calls == 1 and first.usage.cache_hits == 0
    request = openai_env.requests[-1].body
    assert request["messages"][0]["content"] == "Write for everyone in at most 9 sentences."
    assert request["messages"][1]["content"] == "Write for engineers in at most 3 sentences. Describe owls."

    again = run_file(path, {}, instance)
    assert again.success and again.usage.calls == 0 and again.usage.cache_hits == 1
    assert len(openai_env.requests) == 1, "an unchanged library file must not call the model again"

    (root / "style.j2").write_text(STYLE.replace("Write for", "Write kindly for"))
    edited = run_file(path, {}, instance)
    assert edited.success and edited.usage.calls == 1 and edited.usage.cache_hits == 0
    assert len(openai_env.requests) == 2
    assert openai_env.requests[-1].body["messages"][1]["content"].startswith("Write kindly for engineers")
    assert edited.tasks["write"]["output"] != first.tasks["write"]["output"]


def test_the_shipped_workflows_share_the_house_style() -> None:
    specs = load_workflows([SHIPPED_WORKFLOWS_DIR]).specs
    report = specs["research_report"]
    assert report.prompt_library[0] == str(SHIPPED_WORKFLOWS_DIR.resolve() / "prompts")
    assert rendered(report, report.defaults.system) == ("You are a careful research assistant. Be concise, factual "
                                                        "and say when you are unsure.")
    revise = report.step("refine").tasks[1]  # type: ignore[union-attr]
    text = rendered(report, revise.prompt, critique={"issues": ["too long", "no sources"]}, draft="D",
                    loop={"previous": None})
    assert text == "Revise the report to fix these issues:\n- too long\n- no sources\n\nReport:\nD"
    uses = [name for name, spec in specs.items()
            if any("house_style.j2" in (t.system or "") + t.prompt for t in spec.all_tasks())
            or "house_style.j2" in (spec.defaults.system or "")]
    assert sorted(uses) == ["classify_tickets", "research_report", "summarize_documents"]


def test_names_an_included_file_reads_are_checked_as_the_templates_own(tmp_path: Path) -> None:
    library(tmp_path, {"reads.j2": "Facts: {{ facts }}\n{{ inputs.nope }}", "shared.j2": "{{ inputs.topic }}"})
    text = textwrap.dedent("""\
        name: reads_lib
        inputs: {topic: {type: string, default: owls}}
        defaults: {system: '{% include "reads.j2" %}'}
        tasks:
          - name: facts
            prompt: '{% include "shared.j2" %}'
          - name: hidden
            prompt: '{% include "reads.j2" %}'
          - name: named
            prompt: '{% set facts = facts %}{% include "reads.j2" %}'
        """)
    path = tmp_path / "reads_lib.yaml"
    path.write_text(text)
    found = problems(path)
    assert found == [
        "defaults.system: prompt file 'reads.j2', line 1: defaults.system is used by every task, so it may read only "
        "inputs and workflow, not 'facts'",
        "defaults.system: prompt file 'reads.j2', line 2: inputs.nope is not a declared input; declared inputs: topic",
        "tasks[1] (hidden).prompt: prompt file 'reads.j2', line 1: reads task 'facts', which the including template "
        "does not name, so it may not have run; name it there too (pass it to a macro, or {% set facts = facts %} "
        "before the include)",
        "tasks[1] (hidden).prompt: prompt file 'reads.j2', line 2: inputs.nope is not a declared input; declared "
        "inputs: topic",
        "tasks[2] (named).prompt: prompt file 'reads.j2', line 2: inputs.nope is not a declared input; declared "
        "inputs: topic",
    ]


def test_editing_an_included_file_changes_the_tasks_code_version(tmp_path: Path) -> None:
    """The asset code version (spec/versions.py) covers the library files a task's templates use."""
    versions = pytest.importorskip("mp_pipelines.spec.versions")
    root = library(tmp_path, {"style.j2": STYLE, "other.j2": "unused"})
    path = workflow(tmp_path, '{% from "style.j2" import house_rules %}{{ house_rules("x") }}')
    spec = load_workflow_file(path)
    task = spec.tasks[0]
    before = versions.task_code_version(spec, task)
    (root / "other.j2").write_text("changed, but not included")
    assert versions.task_code_version(spec, task) == before
    (root / "style.j2").write_text(STYLE.replace("plain", "warm"))
    assert versions.task_code_version(spec, task) != before


def test_a_copy_of_a_shipped_workflow_finds_the_shipped_house_style(tmp_path: Path) -> None:
    """The shipped workflows import `house_style.j2`; copied to a folder without a `prompts/` of its own, one still
    validates and renders its system message from the shipped library."""
    from mp_pipelines.spec.loader import SHIPPED_WORKFLOWS_DIR

    copy = tmp_path / "research_report.yaml"
    copy.write_text((SHIPPED_WORKFLOWS_DIR / "research_report.yaml").read_text())
    spec = load_workflow_file(copy)
    assert spec.prompt_library[-1] == str(SHIPPED_LIBRARY)
    system = spec.defaults.system
    assert "house_style.j2" in system
    text = rendered(spec, system, inputs={"topic": "tides", "audience": "a technical reader"})
    assert text.strip() and "{%" not in text and "{{" not in text
