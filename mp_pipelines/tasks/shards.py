"""A shard: several items of one fan-out run concurrently on the async client, each with its own record.

Each call is retried by the call path (`calls/retry.py`: 429, 5xx, timeouts, lost connections). An item
whose task fails otherwise (an answer that stays invalid, the task's timeout) is run again here with the
task's `retries` policy. A shard whose items still fail may be retried by Dagster's RetryPolicy (the
task's `retries:`); the retried step reads the run's checkpoint, so only its failed items call the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NoReturn

from mp_pipelines.calls.call import CallScope
from mp_pipelines.calls.deadline import TaskTimeout
from mp_pipelines.calls.retry import RETRIED_KINDS
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import ChatModel, LLMError
from mp_pipelines.spec.models import RetrySpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.size_limits import SettingError
from mp_pipelines.spec.templates import TemplateError, evaluate
from mp_pipelines.tasks.runner import arun_task

MAX_RETRY_DELAY = 3600.0  # seconds
MAX_STEPS_PER_FANOUT = 32  # default: small fan-outs keep one step per item, larger ones ≤ this many shards
WAVES_PER_SHARD = 4  # default shards hold at least this many times the fan-out's breadth
# Errors that every other item of the fan-out would meet too (a refused key, a certificate that does not verify):
# the shard stops at the first one instead of recording, and paying for, the same refusal item by item.
STOPS_THE_FAN_OUT = frozenset({"authentication", "tls", "batch_unsupported"})
# Failures the call path has already retried within the item's retry budget (calls/retry.py): the item is not
# run again here; a step retry (the task's `retries:`) re-runs only the shard's failed items.
RETRIED_BY_THE_CALL = RETRIED_KINDS | {"circuit_open"}


def shard_size(task: TaskSpec, items: int, breadth: int = 1, *, batch: bool = False) -> int:
    """Items per Dagster step: the task's `shard_size`; in batch mode all items in one step (one batch per
    MP_BATCH_MAX_LINES requests); else one item per step up to 32 items; else shards of at least four waves of
    the fan-out's breadth, and never more than 32 steps.

    A step costs about a dozen event writes and a thread that competes for the GIL with the shared loop
    doing the calls; steps beyond those that keep `breadth` calls in flight add cost, not concurrency.
    """
    if task.shard_size is not None:
        return task.shard_size
    if batch:
        return max(items, 1)
    if items <= MAX_STEPS_PER_FANOUT:
        return 1
    return max(math.ceil(items / MAX_STEPS_PER_FANOUT), min(items, WAVES_PER_SHARD * breadth))


@dataclass
class ItemRecord:
    """What happened to one item: its result or error, and what it cost."""

    index: int
    status: str  # success | skipped | failed | stopped (not started: the run's budget was spent)
    output: Any = None
    error: str | None = None
    error_kind: str | None = None
    retryable: bool = False
    attempts: int = 0  # task-level attempts (item retries inside the shard)
    http_attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    provider: str | None = None
    row: Any = None  # the input row, for fan-outs over a table
    raw_output: str | None = None  # the last unusable answer of an item that failed with invalid_output
    run_id: str = ""  # the run that produced this record (a re-executed run may carry its parent's)
    steps: dict[str, Any] | None = None  # an item of a `for_each` call: each task of the called workflow → its answer

    def as_row(self) -> dict[str, Any]:
        return {"index": self.index, "status": self.status, "output": self.output, "error": self.error,
                "error_kind": self.error_kind, "attempts": self.attempts, "http_attempts": self.http_attempts,
                **self.usage.as_dict(), "model": self.model, "provider": self.provider, "row": self.row,
                "raw_output": self.raw_output, "run_id": self.run_id, **({"steps": self.steps} if self.steps else {})}


def retry_delay(retries: RetrySpec, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `attempt` (1-based): Dagster's RetryPolicy formula, capped after jitter."""
    base = retries.delay
    delay = {"exponential": (2**attempt - 1) * base, "linear": base * attempt}.get(retries.backoff or "", base)
    if retries.jitter == "full":
        delay = rand() * delay
    elif retries.jitter == "plus_minus":
        delay = delay + 2 * rand() * base - base
    return min(max(delay, 0.0), MAX_RETRY_DELAY)


async def run_item(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, base_context: Mapping[str, Any], index: int,
                   item: Any, *, scope: CallScope, label: str, deadline_of: Callable[[], float | None],
                   retries: RetrySpec | None, row: Any, log: logging.Logger | Any) -> ItemRecord:
    """One item: its `when`, then its call with up to `retries.max_retries` retries. Item errors are recorded, except
    those in STOPS_THE_FAN_OUT, which are raised."""
    if scope.batch is None:
        return await _run_item(model, spec, task, base_context, index, item, scope=scope, label=label,
                               deadline_of=deadline_of, retries=retries, row=row, log=log)
    try:  # in batch mode, an item that is done no longer holds back its step's batch
        return await _run_item(model, spec, task, base_context, index, item, scope=scope, label=label,
                               deadline_of=deadline_of, retries=retries, row=row, log=log)
    finally:
        scope.batch.item_done()


async def _run_item(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, base_context: Mapping[str, Any], index: int,
                    item: Any, *, scope: CallScope, label: str, deadline_of: Callable[[], float | None],
                    retries: RetrySpec | None, row: Any, log: logging.Logger | Any) -> ItemRecord:
    context = {**base_context, "item": item, "item_index": index}
    record = ItemRecord(index=index, status="failed", row=row)
    try:
        if task.when is not None and not evaluate(task.when, context):
            record.status = "skipped"
            return record
    except TemplateError as exc:
        record.error, record.error_kind = f"`when` could not be evaluated: {exc}", "template"
        return record
    max_attempts = 1 + (retries.max_retries if retries else 0)
    for attempt in range(1, max_attempts + 1):
        record.attempts = attempt
        try:
            run = await arun_task(model, spec, task, context, label=label, scope=scope, deadline=deadline_of())
        except TemplateError as exc:
            record.error, record.error_kind, record.retryable = f"template error: {exc}", "template", False
            return record
        except (LLMError, TaskTimeout) as exc:
            if isinstance(exc, LLMError) and exc.kind in STOPS_THE_FAN_OUT:
                raise
            _record_failure(record, exc)
            if (record.status == "stopped" or not record.retryable or attempt == max_attempts or retries is None
                    # the call path spent its retry budget on it (a batch's failed line was not retried there)
                    or (record.error_kind in RETRIED_BY_THE_CALL and scope.batch is None)):
                return record
            delay = retry_delay(retries, attempt)
            log.warning(f"retrying task {label} in {delay:.1f} s after {record.error_kind}, "
                        f"attempt {attempt + 1}/{max_attempts}")
            await asyncio.sleep(delay)
            continue
        record.status, record.output, record.error, record.error_kind = "success", run.output, None, None
        record.raw_output = None
        record.http_attempts += run.attempts
        record.usage, record.model, record.provider = record.usage + run.usage, run.model, run.provider
        return record
    return record


def _record_failure(record: ItemRecord, exc: LLMError | TaskTimeout) -> None:
    """Note a failed attempt on the item's record: its error, what it cost, and the unusable answer if any."""
    kind = exc.kind if isinstance(exc, LLMError) else "timeout"
    record.error, record.error_kind = str(exc), kind
    record.retryable = exc.retryable if isinstance(exc, LLMError) else True
    record.status = "stopped" if kind == "budget" else "failed"
    record.http_attempts += getattr(exc, "attempts", 0)
    record.usage = record.usage + getattr(exc, "usage", Usage())
    result = getattr(exc, "result", None)
    if result is not None:
        record.raw_output = result.text


async def run_shard(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, base_context: Mapping[str, Any],
                    items: list[tuple[int, Any]], *, is_table: bool, scope: CallScope,
                    deadline_of: Callable[[], float | None], log: Any) -> list[ItemRecord]:
    """Every item of a shard concurrently (the scope's breadth and limits decide how many calls fly).

    An error in STOPS_THE_FAN_OUT or an unusable MP_* setting (SettingError) cancels the other items and is raised
    as itself."""
    retries = task.retries if len(items) > 1 else None
    if scope.batch is not None:
        scope.batch.expect(len(items))
    # A TaskGroup, not gather: when one item raises, the others are cancelled rather than left making paid calls
    # for a step that has already failed.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run_item(model, spec, task, base_context, index, item, scope=scope,
                                                label=f"{task.name}[{index}]", deadline_of=deadline_of,
                                                retries=retries, row=item if is_table else None, log=log))
                     for index, item in items]
    except BaseExceptionGroup as group_error:
        raise_item_error(group_error)
    return [t.result() for t in tasks]


def raise_item_error(group: BaseExceptionGroup) -> NoReturn:
    """Raise what stopped the items of a shard (the errors of their TaskGroup; an item raises no groups, so they
    are flat here): an error in STOPS_THE_FAN_OUT or an unusable MP_* setting (every item's) as itself, anything
    else as its first error rather than as the group's "unhandled errors in a TaskGroup"."""
    stopping = group.subgroup(lambda e: isinstance(e, SettingError)
                              or (isinstance(e, LLMError) and e.kind in STOPS_THE_FAN_OUT))
    if stopping is not None:
        raise stopping.exceptions[0] from None
    raise group.exceptions[0] from group
