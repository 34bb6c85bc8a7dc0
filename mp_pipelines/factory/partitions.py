"""Inbox batches as dynamic partitions: which workflows take them, the partitions and a batch's run config.

A file `MP_INBOX_DIR/<workflow>/<name>` is partition `<name>` of the workflow's job and assets, so one
batch can be re-run from the UI. The inbox sensor reads the same names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from mp_pipelines.factory.names import INPUTS_OP, inputs_step
from mp_pipelines.spec.models import WorkflowSpec

INBOX_ENV = "MP_INBOX_DIR"
DEFAULT_INBOX = Path(".mp_pipelines") / "inbox"


def inbox_input(spec: WorkflowSpec) -> str | None:
    """The table input an inbox file feeds: the workflow's only table input, if every other input has a default."""
    tables = [name for name, input_spec in spec.inputs.items() if input_spec.type == "table"]
    if len(tables) != 1:
        return None
    others_required = [name for name, s in spec.inputs.items() if name != tables[0] and s.required]
    return None if others_required else tables[0]


def inbox_root() -> Path:
    """The inbox folder: MP_INBOX_DIR, else ./.mp_pipelines/inbox (resolved when called)."""
    return Path(os.environ.get(INBOX_ENV) or DEFAULT_INBOX).expanduser().resolve()


def inbox_folder(workflow: str) -> Path:
    return inbox_root() / workflow


def inbox_file(workflow: str, key: str) -> Path:
    """The inbox file of partition `key`; ValueError when the key is no plain file name and would leave the folder."""
    if key in ("", ".", "..") or Path(key).name != key or (os.altsep and os.altsep in key):
        raise ValueError(f"partition key {key!r} of workflow {workflow!r} is not the name of a file in its inbox "
                         f"folder {str(inbox_folder(workflow))!r}; inbox partitions are plain file names")
    return inbox_folder(workflow) / key


def partitions_name(spec: WorkflowSpec) -> str:
    return f"{spec.name}_inbox"


def inbox_partitions_def(spec: WorkflowSpec) -> dg.DynamicPartitionsDefinition | None:
    """The dynamic partitions (one per inbox file) of a workflow that takes inbox batches, else None."""
    if inbox_input(spec) is None:
        return None
    return dg.DynamicPartitionsDefinition(name=partitions_name(spec))


def inbox_run_config(spec: WorkflowSpec, path: Path | str) -> dict[str, Any]:
    """Run config of one batch: the file as the table input, defaults for the other inputs."""
    name = inbox_input(spec)
    if name is None:
        raise ValueError(f"workflow {spec.name!r} takes no inbox batches: it needs exactly one table input "
                         "and defaults for every other input")
    return inputs_run_config(spec, {name: str(path)})


def inputs_run_config(spec: WorkflowSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The run config holding the workflow inputs `values`: `ops.inputs.config`, or `ops.<workflow>__inputs.config`
    for a workflow fed by the inbox (a partitioned job, which Dagster gives no config mapping; see factory/job.py)."""
    return {"ops": {inputs_config_key(spec): {"config": dict(values)}}}


def inputs_config_key(spec: WorkflowSpec) -> str:
    """The key under `ops` of the run config that holds the inputs of `spec`."""
    return inputs_step(spec.name) if inbox_input(spec) is not None else INPUTS_OP


def inbox_partitioned_config(spec: WorkflowSpec) -> dg.PartitionedConfig | None:
    """The job's partitioned config: partition `<file>` reads MP_INBOX_DIR/<workflow>/<file>."""
    partitions_def = inbox_partitions_def(spec)
    if partitions_def is None:
        return None
    return dg.PartitionedConfig(
        partitions_def=partitions_def,
        run_config_for_partition_key_fn=lambda key: inbox_run_config(spec, inbox_file(spec.name, key)),
    )
