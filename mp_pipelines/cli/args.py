"""Command-line arguments the commands share: KEY=VALUE pairs, workflow inputs, executor and budget options.

Nothing here imports Dagster, so `list`, `validate` and `show` stay quick.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from mp_pipelines.factory.names import EXECUTORS

if TYPE_CHECKING:
    from mp_pipelines.spec.models import WorkflowSpec

F = TypeVar("F", bound=Callable[..., Any])


def parse_pairs(pairs: Sequence[str], param_hint: str) -> dict[str, str]:
    """`KEY=VALUE` strings as a dict (later keys win); BadParameter naming `param_hint` for a malformed one."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint=param_hint)
        values[key.strip()] = value
    return values


def read_input_file(input_file: str | None) -> dict[str, Any]:
    """The JSON object of `--input-file` (empty without one); BadParameter when unreadable, nested deeper than
    MAX_DEPTH levels (what walks the inputs next would exhaust Python's stack) or not an object."""
    from mp_pipelines.spec.yaml_guard import MAX_DEPTH

    if not input_file:
        return {}
    too_deep = f"cannot read {input_file}: lists and objects are nested more than {MAX_DEPTH} levels deep"
    try:
        data = json.loads(Path(input_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        reason = exc.msg[:1].lower() + exc.msg[1:]
        raise click.BadParameter(f"cannot read {input_file}: it is not JSON (line {exc.lineno}, column {exc.colno}: "
                                 f"{reason}); it must hold a JSON object of input name → value",
                                 param_hint="--input-file") from None
    except UnicodeDecodeError:
        raise click.BadParameter(f"cannot read {input_file}: it is not UTF-8 text; it must hold a JSON object of "
                                 "input name → value", param_hint="--input-file") from None
    except OSError as exc:
        raise click.BadParameter(f"cannot read {input_file}: {exc.strerror or exc}",
                                 param_hint="--input-file") from None
    except RecursionError:  # the decoder recurses once per level
        raise click.BadParameter(too_deep, param_hint="--input-file") from None
    if _nested_deeper_than(data, MAX_DEPTH):
        raise click.BadParameter(too_deep, param_hint="--input-file")
    if not isinstance(data, dict):
        raise click.BadParameter(f"{input_file} must hold a JSON object of input name → value",
                                 param_hint="--input-file")
    return data


def _nested_deeper_than(value: Any, levels: int) -> bool:
    """Whether lists and objects in `value` nest more than `levels` deep (walked level by level, not recursively)."""
    level = [value]
    for _ in range(levels):
        level = [child for v in level if isinstance(v, (dict, list)) for child in (v.values() if isinstance(v, dict) else v)]
    return any(isinstance(v, (dict, list)) for v in level)


def input_problems(spec: WorkflowSpec, values: Mapping[str, Any],
                   how_to_pass: str = "") -> tuple[dict[str, Any], list[str]]:
    """`values` typed by the spec's inputs, and every unknown, invalid or missing input as one sentence each
    (`how_to_pass` ends the sentence of a missing input, e.g. ": pass --input topic=...")."""
    from mp_pipelines.spec.inputs import coerce_input
    from mp_pipelines.spec.problems import suggest

    problems = []
    unknown = sorted(set(values) - set(spec.inputs))
    if unknown:
        known = ", ".join(f"{name} ({declared.type})" for name, declared in spec.inputs.items()) or "none"
        hints = "".join(suggest(name, spec.inputs).replace("; did you mean", f"; for {name!r} did you mean")
                        for name in unknown)
        given = ", ".join(f"{name} (given {_shown(values[name])})" for name in unknown)
        problems.append(f"unknown input(s) {given} for {spec.name}; its inputs: {known}{hints}")
    checked = {}
    for name, input_spec in spec.inputs.items():
        if name in values:
            try:
                checked[name] = coerce_input(input_spec.type, values[name], name)
            except ValueError as exc:
                problems.append(str(exc))
        elif input_spec.required:
            problems.append(f"input {name!r} of {spec.name} is required ({input_spec.type})"
                            + how_to_pass.replace("{name}", name))
    return checked, problems


def check_inputs(spec: WorkflowSpec, values: dict[str, Any]) -> dict[str, Any]:
    """`values` typed by the spec's inputs; one BadParameter listing every unknown, invalid or missing input."""
    checked, problems = input_problems(spec, values, ": pass --input {name}=...")
    if problems:
        raise click.BadParameter("; ".join(problems), param_hint="--input")
    return checked


def _shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def parse_inputs(spec: WorkflowSpec, pairs: Sequence[str], input_file: str | None) -> dict[str, Any]:
    """Inputs from `--input-file` then `--input key=value` (which wins), checked against the spec."""
    return check_inputs(spec, {**read_input_file(input_file), **parse_pairs(pairs, "--input")})


def parse_untyped_inputs(pairs: Sequence[str], input_file: str | None) -> dict[str, Any]:
    """Inputs without a spec to check them: each `--input` value read as a YAML scalar (`3` → 3, `true` → True)."""
    values = read_input_file(input_file)
    for key, value in parse_pairs(pairs, "--input").items():
        values[key] = _yaml_value(key, value)
    return values


def _yaml_value(key: str, text: str) -> Any:
    """`text` read as YAML (`3` → 3, `true` → True), kept as text when it is not YAML; BadParameter when it nests
    deeper than MAX_DEPTH levels or its aliases expand too far."""
    import yaml

    from mp_pipelines.spec.yaml_guard import MAX_DEPTH, shape_problem

    if not text.strip():
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except RecursionError:  # PyYAML builds nested collections recursively
        problem: str | None = f"mappings and lists are nested more than {MAX_DEPTH} levels deep"
    else:
        problem = shape_problem(value)
    if problem:
        raise click.BadParameter(f"{key}: {problem}", param_hint="--input")
    return value


def parse_remote_inputs(workflow: str, pairs: Sequence[str], input_file: str | None) -> dict[str, Any]:
    """Inputs for a webserver run: checked by the local spec when this machine has it, else by the server."""
    from mp_pipelines.spec.loader import load_workflows

    spec = load_workflows().specs.get(workflow)
    if spec is not None:
        return parse_inputs(spec, pairs, input_file)
    return parse_untyped_inputs(pairs, input_file)


def input_options(command: F) -> F:
    """--input KEY=VALUE (repeatable) and --input-file F.json."""
    command = click.option("--input-file", type=click.Path(exists=True, dir_okay=False),
                           help="JSON object of inputs.")(command)
    return click.option("--input", "-i", "pairs", multiple=True, metavar="KEY=VALUE",
                        help="A workflow input; repeatable.")(command)


def executor_option(command: F) -> F:
    """--executor: one of the job's executors (`factory.names.EXECUTORS`) for this run."""
    return click.option("--executor", type=click.Choice(EXECUTORS), default=None,
                        help="Override the job's executor for this run.")(command)


def mode_option(command: F) -> F:
    """--mode batch|online: how this run's calls are sent (over every task's `mode:`)."""
    return click.option("--mode", type=click.Choice(["batch", "online"]), default=None,
                        help="batch: send this run's calls through the endpoint's Batch API (half the price, "
                        "answers within 24 h); online: call at once. Default: each task's `mode:`.")(command)


def budget_options(command: F) -> F:
    """--max-cost-usd, --max-tokens, --max-calls: this run's budget, over the workflow's `budget:`."""
    for name, kind, text in (("--max-calls", click.IntRange(min=1), "calls"),
                             ("--max-tokens", click.IntRange(min=1), "prompt + completion tokens"),
                             ("--max-cost-usd", click.FloatRange(min=0, min_open=True), "US dollars")):
        command = click.option(name, type=kind, default=None, help=f"Budget: most {text} this run may spend.")(command)
    return command
