"""Names the generated jobs use and other layers read back: step keys, tags, resource keys, outputs.

Every spelling lives here, with a function to build it and, where others parse it, one to read it back:

- every task and loop is an asset `[w, t]` made by one node named `w__t` (node names are unique in the code
  location, since Dagster's asset job holds every workflow's assets): a plain task `t` of workflow `w` is step
  `w__t`; the workflow inputs are step `w__inputs` (asset `[w, inputs]`);
- a fan-out `t` is a graph `w__t` of steps `w__t.t__items` (the items), mapped steps `w__t.t[k]` (one per item
  or shard), `w__t.t__collect` and `w__t.t__publish` (outputs the asset);
- a loop `l` is a graph `w__l`: iteration `n` of its body task `t` is step `w__l.t__n`, its result `w__l.l`;
- task `t`'s quality checks (asset checks of `[w, t]`) run in step `w__t__checks`;
- a task `t` that runs a workflow once is a graph `w__t` of steps `w__t.inputs`, `w__t.<callee step>` and
  `w__t.call__result` (factory/subworkflows.py).

No Dagster here, so the command line and the sensors can read step keys without building a job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mp_pipelines.spec.models import RESERVED_SEPARATOR

INPUTS_OP = "inputs"  # the inputs' local name: their asset `[w, inputs]`, op input and run config `ops.inputs.config`
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
CHECKS_SUFFIX = f"{RESERVED_SEPARATOR}checks"  # ends the step key of a task's quality checks (checks_step)
_TASK_OF_STEP = re.compile(r"\[|" + re.escape(RESERVED_SEPARATOR))


def node_name(workflow: str, name: str) -> str:
    """The top-level node (op or graph) of task, loop or `inputs` `name`: also the step key of a plain task."""
    return f"{workflow}{RESERVED_SEPARATOR}{name}"


def inputs_step(workflow: str) -> str:
    """The step that checks the workflow inputs."""
    return node_name(workflow, INPUTS_OP)


def task_step(workflow: str, task: str) -> str:
    """The step of a plain task."""
    return node_name(workflow, task)


def items_local(task: str) -> str:
    return f"{task}{RESERVED_SEPARATOR}items"


def collect_local(task: str) -> str:
    return f"{task}{RESERVED_SEPARATOR}collect"


def publish_local(task: str) -> str:
    return f"{task}{RESERVED_SEPARATOR}publish"


def publish_step(workflow: str, task: str) -> str:
    """The step that outputs a fan-out's collected value as the task's asset."""
    return f"{node_name(workflow, task)}.{publish_local(task)}"


def items_step(workflow: str, task: str) -> str:
    """The step that lists a fan-out's items."""
    return f"{node_name(workflow, task)}.{items_local(task)}"


def collect_step(workflow: str, task: str) -> str:
    """The step that gathers a fan-out's item records in input order."""
    return f"{node_name(workflow, task)}.{collect_local(task)}"


def mapped_step(workflow: str, task: str, mapping_key: str) -> str:
    """One mapped step of a fan-out (an item or a shard of items)."""
    return keyed_step(f"{node_name(workflow, task)}.{task}", mapping_key)


def keyed_step(step: str, mapping_key: str | None) -> str:
    """The key a step runs under: `step[mapping_key]` for a mapped step, `step` otherwise."""
    return step if mapping_key is None else f"{step}[{mapping_key}]"


def is_mapped_step(step_key: str, workflow: str, task: str) -> bool:
    """Whether `step_key` is one of fan-out `task`'s mapped steps."""
    return step_key.startswith(f"{node_name(workflow, task)}.{task}[")


def shard_mapping_key(first: int, last: int, shard_size: int) -> str:
    """The mapping key of the step holding items first..last: `3` with one item per step, else `0_31`."""
    return str(first) if shard_size == 1 else f"{first}_{last}"


# A workflow run once by task `t` of `w` is a graph `w__t` of steps `w__t.inputs`, `w__t.<its steps>` (fan-outs and
# loops as graphs nested one level further) and this one, which outputs the asset `[w, t]`.
CALL_RESULT_OP = f"call{RESERVED_SEPARATOR}result"


def call_step(workflow: str, task: str, local: str) -> str:
    """Step `local` (a step key inside the called workflow's graph) of the graph of call task `task`."""
    return f"{node_name(workflow, task)}.{local}"


def body_local(task: str, iteration: int) -> str:
    return f"{task}{RESERVED_SEPARATOR}{iteration}"


def body_step(workflow: str, loop: str, task: str, iteration: int) -> str:
    """Loop body task `task` of loop `loop` in iteration `iteration` (1-based)."""
    return f"{node_name(workflow, loop)}.{body_local(task, iteration)}"


def loop_step(workflow: str, loop: str) -> str:
    """The step that publishes a loop's result."""
    return f"{node_name(workflow, loop)}.{loop}"


def checks_step(workflow: str, task: str) -> str:
    """The step running task `task`'s quality checks: op names of asset checks are unique in a code location, so
    it carries the workflow's name too."""
    return f"{workflow}{RESERVED_SEPARATOR}{task}{CHECKS_SUFFIX}"


def task_of_step(step_key: str) -> str:
    """The task behind a step key: `w__report`, `w__research.research[3]`, `w__loop.critique__2` → `report`,
    `research`, `critique`."""
    node = step_key.split("[", 1)[0]
    if "." in node:  # a step inside a fan-out's or loop's graph: its local name tells the task
        local = node.rsplit(".", 1)[1] + step_key[len(node):]
    else:
        local = step_key.partition(RESERVED_SEPARATOR)[2] or step_key
    return _TASK_OF_STEP.split(local, maxsplit=1)[0]


def executor_kind(run_config: Mapping[str, Any]) -> str:
    """Which of the job's executors a run chose (`execution: {config: {<kind>: {...}}}`), default concurrent."""
    execution = (run_config or {}).get("execution") or {}
    if "config" not in execution and len(execution) == 1:  # the named form: {mp_pipelines_executor: {config: …}}
        execution = next(iter(execution.values())) or {}
    chosen = execution.get("config") or {}
    kinds = [kind for kind in chosen if kind in EXECUTORS]
    return kinds[0] if kinds else EXECUTORS[0]
