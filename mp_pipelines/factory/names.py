"""Names the generated jobs use and other layers read back: step keys, tags, resource keys, outputs.

Every spelling lives here, with a function to build it and, where others parse it, one to read it back:

- a plain task `t` is step `t`; the workflow inputs are step `inputs`;
- a fan-out `t` is `t__items` (the items), mapped steps `t[k]` (one per item or shard), `t__collect`;
- iteration `n` of loop body task `t` is `t__n`, and the loop's result step is the loop's name;
- a workflow run once by task `t` is steps `t.inputs`, `t.<its own steps>` and `t.call__result`.

No Dagster here, so the command line and the sensors can read step keys without building a job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mp_pipelines.spec.models import RESERVED_SEPARATOR

INPUTS_OP = "inputs"
ITEM_RECORDS = "item_records"  # a fan-out collector's second output: every item's record, in input order

LLM_RESOURCE_KEY = "llm"
BUDGET_RESOURCE_KEY = "budget"
PROMPT_RESOURCE_KEYS = frozenset({LLM_RESOURCE_KEY, BUDGET_RESOURCE_KEY})

WORKFLOW_TAG = "mp_pipelines/workflow"
PROVIDER_TAG = "mp_pipelines/provider"
FANOUT_TAG = "mp_pipelines/fanout"
LOOP_TAG = "mp_pipelines/loop"
# The tag Dagster puts on from-failure re-executions (read back as DagsterRun.is_resume_retry);
# `mp-pipelines resume` sets it too.
RESUME_RETRY_TAG = "dagster/is_resume_retry"

EXECUTORS = ("concurrent", "multiprocess", "in_process", "celery")  # the job's selectable executors; the first is the default
SPREAD_EXECUTORS = frozenset({"multiprocess", "celery"})  # executors that run a run's steps in several processes
_TASK_OF_STEP = re.compile(r"\[|" + re.escape(RESERVED_SEPARATOR))


def items_step(task: str) -> str:
    """The step that lists a fan-out's items."""
    return f"{task}{RESERVED_SEPARATOR}items"


def collect_step(task: str) -> str:
    """The step that gathers a fan-out's item records in input order."""
    return f"{task}{RESERVED_SEPARATOR}collect"


def mapped_step(task: str, mapping_key: str) -> str:
    """One mapped step of a fan-out (an item or a shard of items)."""
    return f"{task}[{mapping_key}]"


def is_mapped_step(step_key: str, task: str) -> bool:
    """Whether `step_key` is one of fan-out `task`'s mapped steps."""
    return step_key.startswith(f"{task}[")


def shard_mapping_key(first: int, last: int, shard_size: int) -> str:
    """The mapping key of the step holding items first..last: `3` with one item per step, else `0_31`."""
    return str(first) if shard_size == 1 else f"{first}_{last}"


# A workflow run once by task `t` is a graph node `t`: its steps are `t.inputs`, `t.<callee step>` and this one.
CALL_RESULT_OP = f"call{RESERVED_SEPARATOR}result"


def call_step(task: str, inner: str) -> str:
    """Step `inner` (a step key of the called workflow) inside the graph of call task `task`."""
    return f"{task}.{inner}"


def body_step(task: str, iteration: int) -> str:
    """Loop body task `task` in iteration `iteration` (1-based)."""
    return f"{task}{RESERVED_SEPARATOR}{iteration}"


def task_of_step(step_key: str) -> str:
    """The task behind a step key: `research[3]`, `research__items`, `critique__2` → `research`/`critique`."""
    return _TASK_OF_STEP.split(step_key, maxsplit=1)[0]


def executor_kind(run_config: Mapping[str, Any]) -> str:
    """Which of the job's executors a run chose (`execution: {config: {<kind>: {...}}}`), default concurrent."""
    execution = (run_config or {}).get("execution") or {}
    if "config" not in execution and len(execution) == 1:  # the named form: {mp_pipelines_executor: {config: …}}
        execution = next(iter(execution.values())) or {}
    chosen = execution.get("config") or {}
    kinds = [kind for kind in chosen if kind in EXECUTORS]
    return kinds[0] if kinds else EXECUTORS[0]
