"""Inbox batches: which workflows take them, where their files are and a batch's run config.

A file `MP_INBOX_DIR/<workflow>/<name>` becomes one run of the workflow's job (tagged with the file's name), whose
assets it materializes. Runs of a workflow fill its assets' latest values whatever started them (CLI, UI, schedule,
inbox), so the assets are not partitioned: Dagster gives a partitioned job no config mapping (`ops.inputs.config`,
see factory/job.py) and runs no partitioned asset without a partition.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mp_pipelines.factory.names import INPUTS_OP
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


def inbox_run_config(spec: WorkflowSpec, path: Path | str) -> dict[str, Any]:
    """Run config of one batch: the file as the table input, defaults for the other inputs."""
    name = inbox_input(spec)
    if name is None:
        raise ValueError(f"workflow {spec.name!r} takes no inbox batches: it needs exactly one table input "
                         "and defaults for every other input")
    return inputs_run_config(spec, {name: str(path)})


def inputs_run_config(spec: WorkflowSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The run config holding the workflow inputs `values` (`ops.inputs.config`)."""
    return {"ops": {INPUTS_OP: {"config": dict(values)}}}
