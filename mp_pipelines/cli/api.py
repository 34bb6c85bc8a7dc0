"""`mp_pipelines.run_workflow`: run a workflow from Python and get what `mp-pipelines run --json` prints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mp_pipelines.spec.builder import WorkflowBuilder
from mp_pipelines.spec.loader import load_workflow_file, load_workflows, resolve_callees
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.problems import Problem, WorkflowValidationError, suggest

BUDGET_OPTIONS = ("max_cost_usd", "max_tokens", "max_calls")


def resolve_spec(spec_or_name: WorkflowSpec | WorkflowBuilder | str | Path) -> tuple[WorkflowSpec, str | None]:
    """(spec, its YAML file or None) from a spec, a builder, a YAML path or a workflow name.

    WorkflowValidationError for an invalid spec, LookupError for a name no workflow folder has."""
    if isinstance(spec_or_name, WorkflowSpec):  # the workflows its tasks run come from the workflow folders
        return resolve_callees(spec_or_name), None
    if isinstance(spec_or_name, WorkflowBuilder):
        return resolve_callees(spec_or_name.build()), None
    text = str(spec_or_name)
    if isinstance(spec_or_name, Path) or text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_workflow_file(text), str(Path(text).resolve())
    loaded = load_workflows()
    if text in loaded.specs:
        return loaded.specs[text], None
    bad = [p for p in loaded.problems if Path(str(p.file or "")).stem == text]
    if bad:
        raise WorkflowValidationError(bad)
    known = ", ".join(sorted(loaded.specs)) or "none"
    raise LookupError(f"no workflow named {text!r}; known workflows: {known}{suggest(text, loaded.specs)}")


def check_inputs(spec: WorkflowSpec, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` typed by the spec's inputs; one ValueError naming every unknown, invalid or missing input."""
    from mp_pipelines.cli.args import input_problems

    checked, problems = input_problems(spec, values)
    if problems:
        raise ValueError("; ".join(problems))
    return checked


def write_spec(spec: WorkflowSpec, instance: Any = None) -> Path:
    """The spec as a YAML file under the instance's folder, named by its content, for a spec that has no file: a
    run's steps (in other processes too) and a later `mp-pipelines resume` load the job from it."""
    import hashlib

    from mp_pipelines.cli.ui import instance_home

    root = Path(instance.root_directory) if instance is not None and getattr(instance, "root_directory", None) \
        else instance_home()
    text = spec.to_yaml()
    path = root / "specs" / f"{spec.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return path


def run_workflow(spec_or_name: WorkflowSpec | WorkflowBuilder | str | Path, inputs: Mapping[str, Any] | None = None,
                 *, executor: str | None = None, max_cost_usd: float | None = None, max_tokens: int | None = None,
                 max_calls: int | None = None, instance: Any = None, progress: Callable[[str], None] | None = None,
                 verbose: bool = False) -> dict[str, Any]:
    """Run a workflow through Dagster on the CLI's instance and return what `mp-pipelines run --json` prints.

    ValueError (bad inputs), LookupError (unknown name) or WorkflowValidationError (invalid spec) before anything
    runs; a run that fails returns normally with `status` "failure" and each task's `error`.
    """
    from mp_pipelines.cli.running import run_workflow as run

    spec, source = resolve_spec(spec_or_name)
    checked = check_inputs(spec, dict(inputs or {}))
    if source is None and load_workflows().specs.get(spec.name) != spec:
        source = str(write_spec(spec, instance))
    budget = {"max_cost_usd": max_cost_usd, "max_tokens": max_tokens, "max_calls": max_calls}
    outcome = run(spec, checked, source=source, executor=executor, instance=instance, progress=progress,
                  budget=budget, verbose=verbose)
    return outcome.as_json()


__all__ = ["BUDGET_OPTIONS", "Problem", "check_inputs", "resolve_spec", "run_workflow"]
