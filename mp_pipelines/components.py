"""`mp_pipelines.PromptWorkflow`: a Dagster Component that declares one prompt workflow in a `dg` project's
`defs.yaml`, built into the same job, assets, schedule and sensors as the code location of definitions.py.

The workflow is a file next to the `defs.yaml` (`workflow_file`) or the `workflow` attribute itself. Dagster
renders `{{ }}` in `defs.yaml` attributes as its own templates; `workflow` is taken as written (a passthrough
resolver), so prompt templates reach the workflow unrendered, and a workflow file is read by this module,
never by Dagster's templating.
"""

from __future__ import annotations

import functools
import shutil
import textwrap
from pathlib import Path
from typing import Annotated, Any

import click
import dagster as dg
from pydantic import Field

from mp_pipelines.definitions import build_shared_parts, build_shared_resources, build_workflow_parts
from mp_pipelines.sensors.failures import build_failure_sensor
from mp_pipelines.spec.loader import load_workflow_file, parse_workflow
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.problems import Problem, WorkflowValidationError

__all__ = ["PromptWorkflow", "PromptWorkflowError", "PromptWorkflowScaffolder"]

DEFS_FILE = "defs.yaml"


class PromptWorkflowError(dg.DagsterError):
    """A PromptWorkflow component's attributes or workflow are invalid; the message lists file, field, reason."""


@functools.cache
def _shared_resources() -> dict[str, Any]:
    # Definitions.merge accepts a resource key twice only when both hold the same object, so every
    # PromptWorkflow of a project contributes the one set of shared resources.
    return build_shared_resources()


class ScaffoldParams(dg.Model):
    copy_from: str | None = Field(
        default=None, description="A workflow file to copy into the new folder (default: a one-task starter).")


_STARTER = textwrap.dedent("""\
    name: {name}
    description: A one-task starter workflow; edit the prompt and add tasks.
    inputs:
      topic: {{type: string, default: tide pools}}
    tasks:
      - name: summary
        prompt: "Write three sentences about {{{{ inputs.topic }}}}."
    """)


class PromptWorkflowScaffolder(dg.Scaffolder[ScaffoldParams]):
    """`dg scaffold defs mp_pipelines.PromptWorkflow FOLDER`: a defs.yaml pointing at workflow.yaml beside it."""

    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        folder = request.target_path
        copy_from = Path(request.params.copy_from).expanduser() if request.params and request.params.copy_from else None
        if copy_from is not None and not copy_from.is_file():
            # dg runs scaffolders inside its click command: a click error is shown as a usage error, exit 2
            raise click.BadParameter(f"{copy_from.resolve()} is not a workflow file", param_hint="--copy-from")
        folder.mkdir(parents=True, exist_ok=True)
        workflow_path = folder / "workflow.yaml"
        if copy_from is not None:
            shutil.copyfile(copy_from, workflow_path)
        else:
            workflow_path.write_text(_STARTER.format(name=folder.name.replace("-", "_")), encoding="utf-8")
        (folder / DEFS_FILE).write_text(
            f"type: {request.type_name}\nattributes:\n  workflow_file: {workflow_path.name}\n", encoding="utf-8")


@dg.scaffold_with(PromptWorkflowScaffolder)
class PromptWorkflow(dg.Component, dg.Resolvable, dg.Model):
    """One mp-pipelines prompt workflow: its job, task assets, schedule, inbox and run-failure sensors, with the
    LLM and budget resources."""

    workflow_file: Annotated[
        str | None,
        dg.Resolver.default(description="The workflow YAML file, relative to this defs.yaml (relative table "
                                        "inputs resolve against its folder)."),
    ] = None
    workflow: Annotated[
        dict[str, Any] | None,
        dg.Resolver.passthrough(description="The workflow itself (name, inputs, tasks), as in a workflow file. "
                                            "Taken as written: prompt templates are not rendered by Dagster."),
    ] = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        spec, base_dir = self.load_spec(context.path)
        parts = build_workflow_parts(spec, base_dir)
        # Dagster copies each component's sensors (to note their defs.yaml), so one location-wide failure sensor
        # would be defined once per component: each workflow gets its own, watching its job.
        failure_sensor = build_failure_sensor(f"{spec.name}_run_failure_sensor", jobs=list(parts.jobs or []))
        return dg.Definitions.merge(parts, build_shared_parts(_shared_resources(), failure_sensor))

    def load_spec(self, folder: Path) -> tuple[WorkflowSpec, Path]:
        """The validated workflow and the folder its relative table inputs resolve against; PromptWorkflowError
        otherwise."""
        defs_file = str(folder / DEFS_FILE)
        if (self.workflow_file is None) == (self.workflow is None):
            given = "both" if self.workflow is not None else "neither"
            raise PromptWorkflowError(str(Problem(
                defs_file, "attributes", f"give exactly one of workflow_file and workflow ({given} given)")))
        try:
            if self.workflow_file is not None:
                path = folder / self.workflow_file
                return load_workflow_file(path), path.parent
            return parse_workflow(self.workflow, source=defs_file), folder
        except WorkflowValidationError as exc:
            raise PromptWorkflowError(self._describe(exc, defs_file)) from None

    def _describe(self, exc: WorkflowValidationError, defs_file: str) -> str:
        if self.workflow_file is not None:  # problems name the workflow file and its fields
            return f"{defs_file}: attributes.workflow_file: {exc}"
        problems = [Problem(p.file, f"attributes.workflow.{p.path}" if p.path else "attributes.workflow", p.message)
                    for p in exc.problems]
        return str(WorkflowValidationError(problems, defs_file, exc.notes))
