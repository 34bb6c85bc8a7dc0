"""Fuzzing the spec loader: whatever a workflow file holds, loading it gives a WorkflowSpec or a
WorkflowValidationError whose problems name the file and, where they concern a field, its path.

Derandomized, so CI runs the same examples every time; `max_examples` keeps the file near 25 s on 2 cores.
The `@example`s are what the fuzzer found (crashes, a misplaced path), since fixed in loader.py and yaml_guard.py.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mp_pipelines.spec.loader import (
    SHIPPED_WORKFLOWS_DIR,
    Problem,
    WorkflowValidationError,
    load_workflow_file,
    parse_workflow,
)
from mp_pipelines.spec.models import WorkflowSpec

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHIPPED = {path.stem: yaml.safe_load(path.read_text()) for path in sorted(SHIPPED_WORKFLOWS_DIR.glob("*.yaml"))}
# Problems about the whole document rather than one field: the only ones allowed an empty field path.
DOCUMENT_PROBLEMS = ("a workflow must be a mapping", "the file is empty", "invalid YAML", "workflow file ",
                     "mappings and lists are nested", "a YAML alias", "the data holds more than")
# Keys of the spec models, so random documents often get past the first level of validation.
KEYS = ["name", "description", "tasks", "prompt", "depends_on", "for_each", "when", "output", "output_schema",
        "inputs", "type", "default", "defaults", "model", "temperature", "max_tokens", "system", "loop", "until",
        "max_iterations", "retries", "max_retries", "delay", "backoff", "jitter", "timeout", "shard_size",
        "breadth", "depth", "max_items", "limits", "schedule", "cron", "enabled", "tags", "items", "properties"]
TEMPLATE_GARBAGE = ["{{", "}}", "{%", "%}", "{% for x in %}", "{% endfor %}", "{{ inputs.nope }}", "{{ item }}",
                    "{{ loop.previous.x }}", "{{ ''.__class__ }}", "{{ inputs.__class__.__mro__ }}",
                    "{{ cycler.__init__.__globals__ }}", "{{ x|attr('__dict__') }}", "{# ", "{{ 1/0 }}",
                    "{{ plan[ }}", "{% if %}", "{{ research.a.b.c }}", "{% raw %}", "\x00", "é✓", "\n"]


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file path the examples overwrite in turn (function-scoped tmp_path does not mix with @given)."""
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.yaml"


def check_outcome(load: Callable[[], Any], source: str, data: Any = None, *, field_problems_only: bool = False) -> None:
    """`load()` returns a WorkflowSpec or raises WorkflowValidationError with well-placed problems."""
    try:
        spec = load()
    except WorkflowValidationError as exc:
        assert exc.problems and source in str(exc)
        for problem in exc.problems:
            check_problem(problem, source, data, field_problems_only)
    else:
        assert isinstance(spec, WorkflowSpec)


def check_problem(problem: Problem, source: str, data: Any, field_problems_only: bool) -> None:
    """A problem names the file, says something, and has a field path unless it is about the whole document."""
    assert problem.file == source, problem
    assert problem.message.strip(), problem
    if not problem.path:
        assert not field_problems_only and problem.message.startswith(DOCUMENT_PROBLEMS), problem
        return
    if problem.path.startswith("line "):
        assert re.fullmatch(r"line \d+, column \d+", problem.path), problem
        return
    tops = [*WorkflowSpec.model_fields, *(data if isinstance(data, dict) else ())]
    starts = tuple(form for key in tops for form in key_forms(key))
    assert problem.path.startswith(starts), f"{problem}: the path does not start at a top-level key"


def key_forms(key: Any) -> set[str]:
    """How a path may start with top-level key `key`: Pydantic gives a boolean or number key as an int or as text."""
    forms = {str(key), f"[{key!r}]", f"[{str(key)!r}]"}
    if isinstance(key, int):  # booleans too
        forms.add(f"[{int(key)}]")
    return forms


# --- (a) random documents ----------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                    st.sampled_from(KEYS + TEMPLATE_GARBAGE))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(), st.booleans(), st.none())
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=5)), max_leaves=30)
YAML_BITS = ["name: w\n", "tasks:\n", "  - name: a\n", "    prompt: ", "{{ x }}", ": ", "- ", "[", "]", "{", "}",
             "&a ", "*a", "!!python/object:os.system ", "!!binary ", "? ", "|\n", ">\n", "'", '"', "#", "\t", "---\n",
             "...\n", "%YAML 1.1\n", "<<: *a\n", "~", "1e400", "0x1F", "\n", "!!set ", "!!map ", "!!seq ", "!!omap ",
             "!!pairs ", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!str ", "!!null ", "2020-13-45"]
yaml_texts = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(YAML_BITS), max_size=30).map("".join))


@FUZZ
@given(document=documents)
@example(document={False: None})  # a boolean key was reported at path "[0]"
@example(document={"name": "w", "tasks": [{"name": "a", "prompt": "p", 3: "x"}], "tags": {None: "x"}})
def test_random_documents_load_or_fail_with_placed_problems(document: Any, fuzz_file: Path) -> None:
    check_outcome(lambda: parse_workflow(document, source="random.yaml"), "random.yaml", document)
    text = yaml.safe_dump(document, allow_unicode=True)
    fuzz_file.write_text(text, encoding="utf-8")
    check_outcome(lambda: load_workflow_file(fuzz_file), str(fuzz_file), _safe_data(text))


@settings(FUZZ, max_examples=800)
@given(text=yaml_texts)
@example(text="name: w\ntasks:\n  - name: a\n    prompt: {{ inputs.x }}\n")  # TypeError: unhashable type: 'dict'
@example(text="!!set ---\n")  # ValueError: not enough values to unpack
@example(text="name: w\nbreadth: !!int abc\n")  # ValueError from PyYAML's int constructor
@example(text="when: !!timestamp 2020-13-45\n")  # ValueError: month must be in 1..12
def test_random_text_loads_or_fails_with_placed_problems(text: str, fuzz_file: Path) -> None:
    fuzz_file.write_text(text, encoding="utf-8")
    check_outcome(lambda: load_workflow_file(fuzz_file), str(fuzz_file), _safe_data(text))


@settings(FUZZ, max_examples=150)
@given(raw=st.binary(max_size=200))
def test_random_bytes_load_or_fail_with_placed_problems(raw: bytes, fuzz_file: Path) -> None:
    fuzz_file.write_bytes(raw)
    try:
        data = _safe_data(raw.decode("utf-8"))
    except UnicodeDecodeError:
        data = None
    check_outcome(lambda: load_workflow_file(fuzz_file), str(fuzz_file), data)


def _safe_data(text: str) -> Any:
    """The data of a YAML text, for checking problem paths against its keys (None when it does not load).

    Not the data it was dumped from: YAML changes some keys on the way, e.g. a NEL character to a space."""
    try:
        return yaml.safe_load(text)
    except Exception:  # PyYAML raises ValueError, KeyError, ... for some malformed tagged values
        return None


# --- (b) mutations of the shipped specs ---------------------------------------------------------------


def containers(node: Any) -> Iterator[Any]:
    """Every mapping and list in `node`, itself first."""
    if isinstance(node, (dict, list)):
        yield node
        for child in node.values() if isinstance(node, dict) else node:
            yield from containers(child)


def mappings_in(node: Any, key: str) -> list[dict[str, Any]]:
    """The mappings in `node[key]` when it is a list (earlier mutations may have made it anything)."""
    found = node.get(key) if isinstance(node, dict) else None
    return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []


def steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every task and loop mapping of a spec, loop bodies included."""
    return [found for step in mappings_in(spec, "tasks") for found in (step, *mappings_in(step, "tasks"))]


def delete_key(data: st.DataObject, spec: dict[str, Any]) -> None:
    target = data.draw(st.sampled_from([node for node in containers(spec) if isinstance(node, dict) and node]))
    del target[data.draw(st.sampled_from(sorted(target, key=str)))]


def change_type(data: st.DataObject, spec: dict[str, Any]) -> None:
    parent = data.draw(st.sampled_from([node for node in containers(spec) if node]))
    key = data.draw(st.sampled_from(sorted(parent, key=str) if isinstance(parent, dict) else range(len(parent))))
    parent[key] = data.draw(documents)


def rename_key(data: st.DataObject, spec: dict[str, Any]) -> None:
    target = data.draw(st.sampled_from([node for node in containers(spec) if isinstance(node, dict) and node]))
    old = data.draw(st.sampled_from(sorted(target, key=str)))
    new = data.draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=10), st.just(f"{old}s")))
    target[new] = target.pop(old)


def duplicate_task_name(data: st.DataObject, spec: dict[str, Any]) -> None:
    named = steps(spec)
    if len(named) > 1:
        first, second = data.draw(st.lists(st.sampled_from(range(len(named))), min_size=2, max_size=2, unique=True))
        named[second]["name"] = named[first].get("name")


def insert_cycle(data: st.DataObject, spec: dict[str, Any]) -> None:
    top = mappings_in(spec, "tasks")
    if len(top) > 1:
        first, second = data.draw(st.lists(st.sampled_from(range(len(top))), min_size=2, max_size=2, unique=True))
        for step, other in ((top[first], top[second]), (top[second], top[first])):
            depends = step.get("depends_on")
            step["depends_on"] = [*(depends if isinstance(depends, list) else []), other.get("name")]


def garbage_template(data: st.DataObject, spec: dict[str, Any]) -> None:
    task = data.draw(st.sampled_from(steps(spec) or [spec]))
    field = data.draw(st.sampled_from(["prompt", "system", "when"]))
    pieces = st.lists(st.one_of(st.sampled_from(TEMPLATE_GARBAGE), st.text(max_size=8)), min_size=1, max_size=6)
    task[field] = data.draw(pieces.map("".join))


MUTATIONS = [delete_key, change_type, rename_key, duplicate_task_name, insert_cycle, garbage_template]


@settings(FUZZ, max_examples=350)
@given(name=st.sampled_from(sorted(SHIPPED)), data=st.data())
def test_mutated_shipped_specs_load_or_fail_with_placed_problems(name: str, data: st.DataObject,
                                                                 fuzz_file: Path) -> None:
    spec = copy.deepcopy(SHIPPED[name])
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutation(data, spec)
    source = f"{name}.yaml"
    check_outcome(lambda: parse_workflow(spec, source=source), source, spec, field_problems_only=True)
    text = yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)
    fuzz_file.write_text(text, encoding="utf-8")
    check_outcome(lambda: load_workflow_file(fuzz_file), str(fuzz_file), _safe_data(text), field_problems_only=True)


def test_the_shipped_specs_themselves_load() -> None:
    for name, spec in SHIPPED.items():  # from their own folder: they include its prompt library
        assert parse_workflow(copy.deepcopy(spec), source=str(SHIPPED_WORKFLOWS_DIR / f"{name}.yaml")).name == name


@st.composite
def merged_mappings(draw: st.DrawFn) -> str:
    """YAML text of flow mappings, some anchored, later ones merging earlier ones (`<<: *a` or `<<: [*a, *b]`)."""
    lines: list[str] = []
    anchors: list[str] = []
    for index in range(draw(st.integers(1, 6))):
        keys = draw(st.lists(st.sampled_from("abcde"), unique=True, max_size=4))
        body = [f"{key}: {draw(st.integers(0, 9))}" for key in keys]
        if anchors and draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(anchors), min_size=1, max_size=3))
            merge = f"*{chosen[0]}" if len(chosen) == 1 else "[" + ", ".join(f"*{name}" for name in chosen) + "]"
            body.insert(draw(st.integers(0, len(body))), f"<<: {merge}")
        anchor = ""
        if draw(st.booleans()):
            anchors.append(f"m{index}")
            anchor = f"&m{index} "
        lines.append(f"k{index}: {anchor}{{{', '.join(body)}}}")
    return "\n".join(lines) + "\n"


@settings(FUZZ, max_examples=300)
@given(text=merged_mappings())
def test_merge_keys_read_as_yaml_safe_load_reads_them(text: str) -> None:
    from mp_pipelines.spec.yaml_guard import UniqueKeyLoader

    expected = yaml.safe_load(text)
    got = yaml.load(text, Loader=UniqueKeyLoader)
    assert json.dumps(got) == json.dumps(expected)  # the same keys, values and key order
