"""Breadth: a for_each task as a graph of `task__items` → mapped shard steps `task[k]` → `task__collect` (names.py),
made into the task's asset by factory/assets.py.

Small fan-outs keep one step per item; larger ones group items into shards (see tasks/shards.py)
so the number of Dagster steps, and their event-log cost, stays small. Every step outputs a
DataFrame of item records; the collector orders them by input index.
"""

from typing import Any, Iterator, Mapping

import dagster as dg
import pandas as pd

from mp_pipelines.calls.usage import Usage
from mp_pipelines.factory.names import (
    FANOUT_TAG,
    ITEM_RECORDS,
    PROMPT_RESOURCE_KEYS,
    SPREAD_EXECUTORS,
    WORKFLOW_TAG,
    collect_local,
    collect_step,
    executor_kind,
    items_local,
    items_step,
    node_name,
    publish_local,
    publish_step,
    shard_mapping_key,
)
from mp_pipelines.factory.ops import (
    asset_key,
    asset_metadata,
    call_scope,
    chat_model,
    fleet_limits,
    log_fields,
    make_op,
    retry_policy,
    run_batch_settings,
    run_items,
    settle_writes,
    split_inputs,
    task_deadline,
    upstream_ins,
)
from mp_pipelines.spec.inputs import load_table
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec
from mp_pipelines.tasks.runner import build_context, preview, records
from mp_pipelines.tasks.shards import ItemRecord, run_shard, shard_size


def build_items_op(spec: WorkflowSpec, task: TaskSpec, source_kind: str, source: str) -> dg.OpDefinition:
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
        size = shard_size(task, len(items), spec.breadth, batch=run_batch_settings(context, spec, task).mode == "batch")
        shards = [list(enumerate(items))[start:start + size] for start in range(0, len(items), size)]
        context.log.info(f"{task.name}: {len(items)} item(s) in {len(shards)} step(s) of ≤{size}, "
                         f"at most {spec.breadth} call(s) in flight")
        for shard in shards:
            first, last = shard[0][0], shard[-1][0]
            key = shard_mapping_key(first, last, size)
            yield dg.DynamicOutput({"items": shard, "is_table": is_table, "shards": len(shards)},
                                   mapping_key=key, output_name="items")

    ins = upstream_ins([] if source_kind == "input" else [source])
    return make_op(spec, items_local(task.name), compute, step=items_step(spec.name, task.name), ins=ins,
                   outs={"items": dg.DynamicOut(dg.Any)},
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


def _breadth_share(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec, shards: int) -> int:
    """Calls this step may have in flight: the whole breadth when shards share one process (the default
    executors) or the fleet's shared limits hold it across processes (`fleet_limits`); a fair share of it when
    each step is its own process and nothing is shared."""
    if executor_kind(context.run_config) not in SPREAD_EXECUTORS or fleet_limits(context, task.name) is not None:
        return spec.breadth
    return max(1, spec.breadth // max(1, min(shards, spec.breadth)))


def build_shard_op(spec: WorkflowSpec, task: TaskSpec, upstream: list[str],
                   pool: str | None = None) -> dg.OpDefinition:
    """The mapped step of a fan-out: one shard of items, run concurrently under breadth and limits.

    Items that still fail after their retries fail the step (`on_item_failure: fail`) or are kept as
    failed records for the collector to list (`skip`); items the budget stopped are always passed on.
    """
    policy, _ = spec.failure_policy(task)

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        shard = values.pop("item")
        items = shard["items"]
        breadth = _breadth_share(context, spec, task, shard["shards"])
        outcome = _run_items(context, spec, task, workflow_inputs, values, items, shard["is_table"], breadth)
        frame = pd.DataFrame([record.as_row() for record in outcome])
        failed = [record for record in outcome if record.status == "failed"]
        usage = sum((record.usage for record in outcome), Usage())
        metadata = {**usage.as_metadata(), "items": len(outcome), "failed_items": len(failed),
                    "stopped_items": sum(r.status == "stopped" for r in outcome),
                    "skipped_items": sum(r.status == "skipped" for r in outcome),
                    "http_attempts": int(sum(r.http_attempts for r in outcome)),
                    "models": dg.MetadataValue.json(models_used(outcome))}
        if failed and policy == "fail":
            raise _shard_failure(task, items, failed, metadata)
        context.log.info(f"{task.name}[{items[0][0]}…{items[-1][0]}]: {len(outcome)} item(s), {usage.calls} call(s), "
                         f"{usage.cache_hits} cache hit(s), {usage.prompt_tokens}+{usage.completion_tokens} tokens"
                         + (f", {len(failed)} failed (skipped by on_item_failure)" if failed else ""),
                         extra={"mp": log_fields(context, usage, next((r.model for r in outcome if r.model), None),
                                                 task.name)})
        yield dg.Output(frame, metadata=metadata)

    # Aliased to `task` inside the fan-out's graph, so its mapped steps read `<graph>.task[k]`.
    return make_op(spec, shard_local(task.name), compute, step=f"{node_name(spec.name, task.name)}.{task.name}",
                   ins={"item": dg.In(dg.Any), **upstream_ins(upstream)},
                   description=task.description or None, retry_policy=retry_policy(task),
                   required_resource_keys=PROMPT_RESOURCE_KEYS, pool=pool,
                   tags={WORKFLOW_TAG: spec.name, FANOUT_TAG: f"{spec.name}.{task.name}"})


def _run_items(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec, workflow_inputs: Mapping[str, Any],
               values: Mapping[str, Any], items: list[tuple[int, Any]], is_table: bool, breadth: int) -> list[ItemRecord]:
    """Run items of the fan-out concurrently on the shared loop; their answers are stored before this returns.

    An error that stops the whole fan-out (a refused key) fails the step at once, whatever `on_item_failure` says."""
    if task.workflow is not None:  # a workflow run per item: its tasks run inside this step
        from mp_pipelines.factory.subworkflows import run_call_items

        return run_call_items(context, spec, task, workflow_inputs, values, items, is_table, breadth)
    base = build_context(spec, workflow_inputs, values)
    scope = call_scope(context, spec, task, fanout=task.name, breadth=breadth)
    llm = chat_model(context)
    coro = run_shard(llm, spec, task, base, items, is_table=is_table, scope=scope,
                     deadline_of=lambda: task_deadline(task), log=context.log)
    outcome = run_items(context, task, coro)
    settle_writes(scope)
    for record in outcome:
        record.run_id = context.run_id
    return outcome


def _shard_failure(task: TaskSpec, items: list[tuple[int, Any]], failed: list[ItemRecord],
                   metadata: dict[str, Any]) -> dg.Failure:
    """A failed step: a one-item step may be retried by its RetryPolicy; a shard already retried its items."""
    first = failed[0]
    if len(items) == 1:
        extra = {"raw_output": dg.MetadataValue.text(preview(first.raw_output, 2000))} if first.raw_output else {}
        return dg.Failure(first.error or "failed", metadata={**metadata, "error_kind": first.error_kind or "", **extra},
                          allow_retries=first.retryable)
    # A step retry (the task's RetryPolicy) re-runs the shard with the run's checkpoint: the items that were
    # answered are not asked again, only the failed ones.
    return dg.Failure(f"task {task.name}: {len(failed)} of {len(items)} item(s) failed after "
                      f"{max(first.attempts, first.http_attempts)} attempt(s): {_listing([r.as_row() for r in failed])}",
                      metadata={**metadata, "error_kind": first.error_kind or ""},
                      allow_retries=any(r.retryable for r in failed))


def models_used(outcome: list[ItemRecord]) -> dict[str, int]:
    """Model that answered → calls made to it, over a shard's answered items (`tasks.<t>.models` of run --json)."""
    used: dict[str, int] = {}
    for record in outcome:
        if record.status == "success" and record.model:
            used[record.model] = used.get(record.model, 0) + record.usage.calls
    return used


def _listing(rows: list[dict[str, Any]], limit: int = 5) -> str:
    """"[3] error; [7] error …": the first failed items of item-record rows."""
    return "; ".join(f"[{r['index']}] {r['error']}" for r in rows[:limit]) + (" …" if len(rows) > limit else "")


def failed_items(item_records: pd.DataFrame, items: Mapping[int, Any], limit: int = 100) -> list[dict[str, Any]]:
    """The failed items of a fan-out for metadata and the run summary: index, item, error, attempts."""
    failed = item_records[item_records["status"] == "failed"]
    return [{"index": int(r["index"]), "item": preview(items.get(int(r["index"])), 200),
             "error": r["error"], "error_kind": r["error_kind"],
             "attempts": int(max(r["attempts"], r.get("http_attempts") or 0)),
             **({"raw_output": preview(r["raw_output"], 500)} if r["raw_output"] else {})}
            for r in failed.head(limit).to_dict(orient="records")]


def shard_local(task: str) -> str:
    """The shard op's own name (unique, since task names have no `__`); its node in the graph is `task`."""
    return f"{task}__shard"


def build_collect_op(spec: WorkflowSpec, task: TaskSpec, upstream: list[str],
                     pool: str | None = None) -> dg.OpDefinition:
    """Gathers the fan-out's item records in input order into a list (or a DataFrame for tables).

    It also finishes what an earlier attempt left: items the budget stopped, items that failed in the
    run this one re-executes (`skip`), and items whose steps never ran there (Dagster 1.13 does not
    re-execute mapped steps that had not started when a run was killed): they run here, under this
    run's budget, with the run family's stored answers. Then it applies
    the failure policy: with `skip`, failed items are listed and left out, and the task fails below
    `min_success_ratio`; items still stopped by the budget fail the run after the partial result is
    materialised.
    """
    policy, min_ratio = spec.failure_policy(task)

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        item_records = collected_records(values.pop("records"))
        shards = values.pop("shards")
        all_items = {index: item for shard in shards for index, item in shard["items"]}
        is_table = bool(shards) and shards[0]["is_table"]
        item_records, new_usage = _finish_items(context, spec, task, workflow_inputs, values, item_records,
                                                all_items, is_table)
        counts = {status: int(n) for status, n in item_records["status"].value_counts().items()}
        done, failed, stopped = (counts.get(k, 0) for k in ("success", "failed", "stopped"))
        value = collected_value(item_records[item_records["status"].isin(["success", "skipped"])])
        listing = failed_items(item_records, all_items)
        metadata = _collected_metadata(context, item_records, counts, listing, shards=len(inputs["records"]))
        step_meta = {**new_usage.as_metadata(), **({"failed": dg.MetadataValue.json(listing)} if listing else {})}
        failure = _policy_failure(task, policy, min_ratio, item_records, counts, step_meta)
        if failure is not None:
            raise failure
        counts_meta = {"items": len(item_records), "skipped_items": metadata["skipped_items"], "failed_items": failed}
        # The asset's metadata: the whole fan-out's usage in this run (summed up, see asset_metadata), the failed
        # items and the item table. What this step itself spent (`llm/`) stays on this step's output, counted once.
        summary = {k: v for k, v in asset_metadata(metadata, value).items() if not k.startswith("llm/")}
        asset_meta = {**summary, **counts_meta, **fanout_metadata(item_records, all_items)}
        if stopped:
            # The partial result is recorded on the task's asset, and this step fails: resuming the run re-runs it,
            # and it finishes the stopped items under the new run's budget.
            reason = item_records[item_records["status"] == "stopped"]["error"].iloc[0]
            yield dg.AssetMaterialization(asset_key(spec, task.name), metadata={**asset_meta, "complete": False})
            raise dg.Failure(f"task {task.name}: {stopped} of {len(item_records)} item(s) not run: {reason}",
                             metadata={**step_meta, "error_kind": "budget", "completed_items": done},
                             allow_retries=False)
        if failed:
            context.log.warning(f"{task.name}: {failed} of {done + failed} item(s) failed and are left out "
                                f"(on_item_failure: skip): {_failed_text(item_records)}")
        own = {k: v for k, v in step_meta.items() if k != "failed"}  # the publish step's output lists them
        yield dg.Output(item_records, ITEM_RECORDS, metadata={**own, **counts_meta})
        yield dg.Output({"value": value, "metadata": asset_meta})

    outs = {ITEM_RECORDS: dg.Out(dg.Any, description="One row per item: status, output, error, attempts, usage."),
            "result": dg.Out(dg.Any, description="The value to publish and its metadata.")}
    ins = {"records": dg.In(dg.List[dg.Any]), "shards": dg.In(dg.List[dg.Any]), **upstream_ins(upstream)}
    return make_op(spec, collect_local(task.name), compute, step=collect_step(spec.name, task.name), ins=ins,
                   outs=outs, description=f"Results of {task.name}, in input order.", pool=pool,
                   required_resource_keys=PROMPT_RESOURCE_KEYS, tags={WORKFLOW_TAG: spec.name})


def _collected_metadata(context: dg.OpExecutionContext, item_records: pd.DataFrame, counts: Mapping[str, int],
                        listing: list[dict[str, Any]], *, shards: int) -> dict[str, Any]:
    """The fan-out asset's metadata: this run's spend, models, item counts and the failed items."""
    called = item_records[item_records["status"] == "success"]
    # This run's spend only: in a resumed run the parent's items were paid for (and reported) there.
    metadata = {**Usage.of_rows(item_records[item_records["run_id"] == context.run_id]).as_metadata(),
                "model": ", ".join(sorted(called["model"].dropna().unique())),
                "provider": ", ".join(sorted(called["provider"].dropna().unique())),
                "items": len(item_records), "shards": shards, "skipped_items": counts.get("skipped", 0),
                "failed_items": counts.get("failed", 0), "stopped_items": counts.get("stopped", 0)}
    if listing:
        metadata["failed"] = dg.MetadataValue.json(listing)
    return metadata


def _failed_text(item_records: pd.DataFrame) -> str:
    return _listing(item_records[item_records["status"] == "failed"].to_dict(orient="records"))


def _policy_failure(task: TaskSpec, policy: str, min_ratio: float | None, item_records: pd.DataFrame,
                    counts: Mapping[str, int], step_meta: Mapping[str, Any]) -> dg.Failure | None:
    """The failure the task's `on_item_failure` / `min_success_ratio` calls for, if any.

    Unset, `min_success_ratio` still asks for one success: a fan-out whose every item failed produced nothing,
    and only an explicit `min_success_ratio: 0` says that is acceptable. Items the budget stopped are left to
    the budget's own failure."""
    done, failed, stopped = (counts.get(k, 0) for k in ("success", "failed", "stopped"))
    attempted = done + failed + stopped
    if failed and policy == "fail":
        return dg.Failure(f"task {task.name}: {failed} item(s) failed: {_failed_text(item_records)}",
                          metadata={**step_meta, "error_kind": "item_failure"}, allow_retries=False)
    if policy != "skip" or not attempted:
        return None
    if min_ratio is None and failed and not done:
        return dg.Failure(f"task {task.name}: 0 of {attempted} item(s) succeeded; set min_success_ratio: 0 to accept "
                          f"a fan-out where every item fails; failed: {_failed_text(item_records)}",
                          metadata={**step_meta, "error_kind": "min_success_ratio"}, allow_retries=False)
    if min_ratio is not None and done / attempted < min_ratio:
        return dg.Failure(f"task {task.name}: {done} of {attempted} item(s) succeeded ({done / attempted:.0%}), below "
                          f"its min_success_ratio of {min_ratio:.0%}; failed: {_failed_text(item_records)}",
                          metadata={**step_meta, "error_kind": "min_success_ratio"}, allow_retries=False)
    return None


def _finish_items(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec, workflow_inputs: Mapping[str, Any],
                  values: Mapping[str, Any], item_records: pd.DataFrame, all_items: Mapping[int, Any],
                  is_table: bool) -> tuple[pd.DataFrame, Usage]:
    """Run the items an earlier attempt left: budget-stopped ones, a parent run's failed ones, and missing ones."""
    redo = (item_records["status"] == "stopped") | (
        (item_records["status"] == "failed") & (item_records["run_id"] != context.run_id))
    missing = sorted(set(all_items) - set(item_records["index"]))
    if missing:
        context.log.warning(f"{task.name}: {len(missing)} item(s) have no result (their steps did not run in the run "
                            "this one re-executes); running them here")
    todo = sorted([int(i) for i in item_records[redo]["index"]] + missing)
    if not todo:
        return item_records, Usage()
    context.log.info(f"{task.name}: running {len(todo)} item(s) an earlier attempt did not finish")
    outcome = _run_items(context, spec, task, workflow_inputs, values, [(i, all_items[i]) for i in todo], is_table,
                         spec.breadth)
    fresh = pd.DataFrame([record.as_row() for record in outcome])
    merged = pd.concat([item_records[~redo], fresh], ignore_index=True)
    return merged.sort_values("index", kind="stable").reset_index(drop=True), Usage.of_rows(fresh)


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


TABLE_ROWS = 1_000  # items shown in a fan-out asset's table; every record stays in the stored value
_TABLE_PREVIEW_CHARS = 200
ITEM_TABLE_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("index", "int", description="The item's position in the input."),
    dg.TableColumn("item", "string", description="The item (a preview)."),
    dg.TableColumn("status", "string", description="success, skipped, failed or stopped."),
    dg.TableColumn("answer", "string", description="The answer (a preview), or the error."),
    dg.TableColumn("tokens", "int", description="Prompt + completion tokens."),
    dg.TableColumn("cost_usd", "float", description="US dollars, from the price table."),
])


def fanout_metadata(item_records: pd.DataFrame, items: Mapping[int, Any]) -> dict[str, Any]:
    """A fan-out asset's item table (the first TABLE_ROWS items) and how many of its items it shows."""
    shown = item_records.head(TABLE_ROWS)
    rows = []
    for record in shown.to_dict(orient="records"):
        answer = record["output"] if record["status"] in ("success", "skipped") else record["error"]
        rows.append(dg.TableRecord({
            "index": int(record["index"]),
            "item": preview(items.get(int(record["index"])), _TABLE_PREVIEW_CHARS),
            "status": str(record["status"]),
            "answer": preview(answer if answer is not None else "", _TABLE_PREVIEW_CHARS),
            "tokens": int((record.get("prompt_tokens") or 0) + (record.get("completion_tokens") or 0)),
            "cost_usd": float(record.get("cost_usd") or 0.0),
        }))
    total = len(item_records)
    return {"item_table": dg.MetadataValue.table(rows, schema=ITEM_TABLE_SCHEMA),
            "items_shown": f"{len(rows):,} of {total:,}" + (f" (the first {TABLE_ROWS:,})" if total > TABLE_ROWS else "")}


def build_publish_op(spec: WorkflowSpec, task: TaskSpec) -> dg.OpDefinition:
    """The fan-out's last step: outputs the collected value as the task's asset, with its item table.

    A separate step because Dagster only lets an op inside an asset's graph output what leads to an asset: it takes
    the collector's item records too, so they are stored for `mp-pipelines run` to report."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        collected = inputs["collected"]
        yield dg.Output(collected["value"], metadata=collected["metadata"])

    ins = {"collected": dg.In(dg.Any), "records": dg.In(dg.Any)}
    return make_op(spec, publish_local(task.name), compute, step=publish_step(spec.name, task.name), ins=ins,
                   outs={"result": dg.Out(dg.Any)}, description=f"Publishes {task.name} as its asset.",
                   tags={WORKFLOW_TAG: spec.name})
