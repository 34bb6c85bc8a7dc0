"""Helpers for tests that run whole workflows through Dagster."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from mp_pipelines.cli.running import RunOutcome, run_workflow
from mp_pipelines.spec.loader import load_workflow_file

_FAN = """
name: {name}
breadth: {breadth}
{defaults}cache: off
{extra}
inputs:
  words: {{type: list, default: {words}}}
tasks:
  - name: echo
    for_each: inputs.words
    prompt: "Echo {{{{ item }}}}"{task_extra}
{more_tasks}"""


def fan_workflow(name: str, words: list[str], *, breadth: int, defaults: str = "", extra: str = "",
                 task_extra: str = "", more_tasks: str = "") -> str:
    """A workflow whose task `echo` fans out over `words` (cache off): `defaults` a flow mapping for its
    `defaults:`, `extra` top-level YAML, `task_extra` lines of `echo`, `more_tasks` tasks after it."""
    return _FAN.format(name=name, breadth=breadth, defaults=f"defaults: {defaults}\n" if defaults else "",
                       extra=extra, words=json.dumps(words), task_extra=task_extra, more_tasks=more_tasks)


def write_workflow(folder: Path, text_or_data: str | dict[str, Any]) -> Path:
    """Write a workflow YAML file into `folder` and return its path."""
    text = text_or_data if isinstance(text_or_data, str) else yaml.safe_dump(text_or_data, sort_keys=False)
    text = textwrap.dedent(text)
    name = yaml.safe_load(text)["name"]
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def run_file(path: Path, inputs: dict[str, Any], instance: dg.DagsterInstance,
             executor: str | None = "in_process", budget: dict[str, Any] | None = None) -> RunOutcome:
    """Run the workflow in `path` on `instance` (in-process unless told otherwise; `budget`: the run's budget)."""
    spec = load_workflow_file(path)
    return run_workflow(spec, inputs, source=str(path.resolve()), executor=executor, instance=instance,
                        budget=budget)


def materializations(instance: dg.DagsterInstance, run_id: str, *,
                     with_inputs: bool = False) -> list[dg.AssetMaterialization]:
    """Every task asset materialization the run recorded, in order (with the workflow inputs' `[w, inputs]` when
    `with_inputs`)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    events = [r.event_log_entry.asset_materialization for r in records]
    return [e for e in events if with_inputs or e.asset_key.path[-1] != "inputs"]
