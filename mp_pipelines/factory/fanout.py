"""Breadth: a for_each task as `task__items` → mapped shard steps `task[k]` → `task__collect`.

Small fan-outs keep one step per item; larger ones group items into shards (see execution/shards.py)
so the number of Dagster steps, and their event-log cost, stays small. Every step outputs a
DataFrame of item records; the collector orders them by input index.
"""

from typing import Any, Iterator, Mapping

import dagster as dg
import pandas as pd

from mp_pipelines.execution.aio import shared_loop
from mp_pipelines.execution.runner import build_context, preview, records
from mp_pipelines.execution.shards import ItemRecord, run_shard, shard_size
from mp_pipelines.execution.usage import Usage
from mp_pipelines.factory.ops import (
    FANOUT_TAG,
    LLM_RESOURCE_KEY,
    WORKFLOW_TAG,
    Node,
    call_scope,
    make_op,
    materialization,
    retry_policy,
    run_is_stopping,
    split_inputs,
    task_deadline,
    upstream_ins,
)
from mp_pipelines.spec.inputs import load_table
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec


def build_items_op(spec: WorkflowSpec, task: TaskSpec, source_kind: str, source: str) -> Node:
    """The fan-out: one dynamic output per shard of (index, item) pairs."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        items, is_table = _items(spec, task, source_kind, source, workflow_inputs, values)
        if len(items) > spec.max_items:
            raise dg.Failure(
                f"task {task.name}: for_each over {task.for_each} has {len(items)} items, more than the "
                f"workflow's max_items ({spec.max_items}); raise max_items or split the input",
                allow_retries=False,
            )
        size = shard_size(task, len(items))
        shards = [list(enumerate(items))[start:start + size] for start in range(0, len(items), size)]
        context.log.info(f"{task.name}: {len(items)} item(s) in {len(shards)} step(s) of ≤{size}, "
                         f"at most {spec.breadth} call(s) in flight")
        for shard in shards:
            first, last = shard[0][0], shard[-1][0]
            key = str(first) if size == 1 else f"{first}_{last}"
            yield dg.DynamicOutput({"items": shard, "is_table": is_table, "shards": len(shards)},
                                   mapping_key=key, output_name="items")

    ins = upstream_ins([] if source_kind == "input" else [source])
    return make_op(spec, f"{task.name}__items", compute, ins=ins, outs={"items": dg.DynamicOut(dg.Any)},
                   description=f"Items that {task.name} fans out over.", tags={WORKFLOW_TAG: spec.name})


def _items(spec: WorkflowSpec, task: TaskSpec, source_kind: str, source: str, workflow_inputs: Mapping[str, Any],
           values: Mapping[str, Any]) -> tuple[list[Any], bool]:
    if source_kind == "input":
        value = workflow_inputs[source]
        if spec.inputs[source].type == "table":
            try:
                value = load_table(value, name=source, max_rows=spec.max_items)
            except (OSError, ValueError) as exc:
                raise dg.Failure(f"task {task.name}: {exc}", allow_retries=False) from None
    else:
        value = values[source]
    if isinstance(value, pd.DataFrame):
        return records(value), True
    if not isinstance(value, list):
        raise dg.Failure(
            f"task {task.name}: for_each over {task.for_each} needs a list, but it is a {type(value).__name__}: "
            f"{preview(value, 200)}", allow_retries=False)
    return value, False


def _breadth_share(context: dg.OpExecutionContext, spec: WorkflowSpec, shards: int) -> int:
    """Calls this step may have in flight: the whole breadth when shards share one process (the default
    executors); a fair share of it when each step is its own process (multiprocess)."""
    execution = context.run_config.get("execution") or {}
    if "multiprocess" not in str(execution):
        return spec.breadth
    return max(1, spec.breadth // max(1, min(shards, spec.breadth)))


def build_shard_op(spec: WorkflowSpec, task: TaskSpec, upstream: list[str], pool: str | None = None) -> Node:
    """The mapped step of a fan-out: one shard of items, run concurrently under breadth and limits."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        shard = values.pop("item")
        items = shard["items"]
        base = build_context(spec, workflow_inputs, values)
        scope = call_scope(context, spec, fanout=task.name, breadth=_breadth_share(context, spec, shard["shards"]))
        llm = getattr(context.resources, LLM_RESOURCE_KEY)
        coro = run_shard(llm, spec, task, base, items, is_table=shard["is_table"], scope=scope,
                         deadline_of=lambda: task_deadline(task), log=context.log)
        outcome = shared_loop().run(coro, should_stop=lambda: run_is_stopping(context))
        frame = pd.DataFrame([record.as_row() for record in outcome])
        failed = [record for record in outcome if record.status == "failed"]
        usage = sum((record.usage for record in outcome), Usage())
        metadata = {**usage.as_metadata(), "items": len(outcome), "failed_items": len(failed),
                    "skipped_items": sum(r.status == "skipped" for r in outcome),
                    "http_attempts": int(sum(r.http_attempts for r in outcome))}
        if failed:
            raise _shard_failure(task, items, failed, metadata)
        context.log.info(f"{task.name}[{items[0][0]}…{items[-1][0]}]: {len(outcome)} item(s), {usage.calls} call(s), "
                         f"{usage.prompt_tokens}+{usage.completion_tokens} tokens")
        yield dg.Output(frame, metadata=metadata)

    return make_op(spec, task.name, compute, ins={"item": dg.In(dg.Any), **upstream_ins(upstream)},
                   description=task.description or None, retry_policy=retry_policy(task),
                   required_resource_keys={LLM_RESOURCE_KEY}, pool=pool,
                   tags={WORKFLOW_TAG: spec.name, FANOUT_TAG: f"{spec.name}.{task.name}"})


def _shard_failure(task: TaskSpec, items: list[tuple[int, Any]], failed: list[ItemRecord],
                   metadata: dict[str, Any]) -> dg.Failure:
    """A failed step: a one-item step may be retried by its RetryPolicy; a shard already retried its items."""
    first = failed[0]
    if len(items) == 1:
        return dg.Failure(first.error or "failed", metadata={"error_kind": first.error_kind or ""},
                          allow_retries=first.retryable)
    listing = "; ".join(f"[{r.index}] {r.error}" for r in failed[:5]) + (" …" if len(failed) > 5 else "")
    return dg.Failure(f"task {task.name}: {len(failed)} of {len(items)} item(s) failed after "
                      f"{first.attempts} attempt(s): {listing}", metadata={**metadata, "error_kind": first.error_kind or ""},
                      allow_retries=False)


def build_collect_op(spec: WorkflowSpec, task: TaskSpec) -> Node:
    """Gathers the fan-out's item records in input order into a list (or a DataFrame for tables)."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        item_records = collected_records(inputs["records"])
        value = collected_value(item_records)
        usage = Usage(int(item_records["calls"].sum()), int(item_records["prompt_tokens"].sum()),
                      int(item_records["completion_tokens"].sum()), float(item_records["latency_s"].sum()))
        called = item_records[item_records["status"] == "success"]
        metadata = {**usage.as_metadata(), "model": ", ".join(sorted(called["model"].dropna().unique())),
                    "provider": ", ".join(sorted(called["provider"].dropna().unique())),
                    "items": len(item_records), "shards": len(inputs["records"]),
                    "skipped_items": int((item_records["status"] == "skipped").sum())}
        yield materialization(context, spec, task.name, value, metadata)
        yield dg.Output(value, metadata={"items": len(item_records), "skipped_items": metadata["skipped_items"]})

    return make_op(spec, f"{task.name}__collect", compute, ins={"records": dg.In(dg.List[dg.Any])},
                   description=f"Results of {task.name}, in input order.", tags={WORKFLOW_TAG: spec.name})


def collected_records(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """All shards' item records, ordered by input index (an empty fan-out gives no rows, same columns)."""
    if not frames:
        return pd.DataFrame(columns=list(ItemRecord(index=0, status="").as_row()))
    return pd.concat(frames, ignore_index=True).sort_values("index", kind="stable").reset_index(drop=True)


def collected_value(item_records: pd.DataFrame) -> Any:
    """A fan-out's output: item results in order; over a table, the input rows with result columns."""
    outputs = list(item_records["output"])
    rows = list(item_records["row"])
    if not rows or rows[0] is None:
        return outputs
    frame = pd.DataFrame(rows)
    if all(isinstance(o, dict) or o is None for o in outputs) and any(isinstance(o, dict) for o in outputs):
        for key in dict.fromkeys(k for o in outputs if isinstance(o, dict) for k in o):
            column = key if key not in frame.columns else f"result_{key}"
            frame[column] = [o.get(key) if isinstance(o, dict) else None for o in outputs]
    else:
        frame["result"] = outputs
    frame["item_status"] = list(item_records["status"])
    return frame
