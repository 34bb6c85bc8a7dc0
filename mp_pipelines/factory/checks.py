"""A task's `checks:` as Dagster asset checks of its asset `[workflow, task]` (evaluated by tasks/checks.py).

One multi-asset check per task with checks, in step `<workflow>__<task>__checks` (names.py): it loads the task's
stored value, yields one AssetCheckResult per check (severity WARN or ERROR, metadata naming the failing items),
and fails when a blocking check fails with severity error, so Dagster skips the assets downstream of the task;
the failure names the checks and their failing items. Judge checks call the model through the call path, under
the run's LLM and budget resources; the step runs inside `observe.observed`, so their calls have the step's span
as parent and are tallied with the task's (`mp/calls` on the first check result, or on the step's failure).
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from mp_pipelines.factory.names import PROMPT_RESOURCE_KEYS, WORKFLOW_TAG, checks_step
from mp_pipelines.factory.observe import observed
from mp_pipelines.factory.ops import asset_key, call_scope, chat_model, failure_metadata, run_is_stopping, settle_writes
from mp_pipelines.llm.types import LLMError
from mp_pipelines.spec.checks import CheckSpec, check_names
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec
from mp_pipelines.tasks.checks import CheckOutcome, Judged, evaluate_all, judge, judge_task, task_answers

_SEVERITY = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR}


def describe_check(check: CheckSpec) -> str:
    """What a check asks, for the Checks tab."""
    ratio = "" if check.ratio_threshold == 1 else f" (at least {check.ratio_threshold:.0%} of answers)"
    what = {
        "non_empty": "every answer is non-empty",
        "max_chars": f"answers have at most {check.value} characters",
        "min_chars": f"answers have at least {check.value} characters",
        "matches": f"answers match {check.pattern!r}",
        "json_schema": "answers validate against " + ("the check's schema" if check.schema_ else "the output_schema"),
        "unique_ratio": "answers are distinct",
        "in_set": f"answers are one of {check.values}",
        "judge": f"a judge scores answers at least {check.score_threshold:g} of 5 against: {check.rubric}",
    }[check.type]
    blocking = ", blocking" if check.blocking else ""
    return f"{what}{ratio} [{check.severity}{blocking}]"


def check_result(spec: WorkflowSpec, task: TaskSpec, outcome: CheckOutcome) -> dg.AssetCheckResult:
    """The asset check result of one outcome: JSON values as JSON metadata, numbers and text as themselves."""
    metadata: dict[str, Any] = {}
    for key, value in outcome.metadata.items():
        if isinstance(value, (list, dict)):
            metadata[key] = dg.MetadataValue.json(value)
        elif value is not None:
            metadata[key] = value
    return dg.AssetCheckResult(asset_key=asset_key(spec, task.name), check_name=outcome.name, passed=outcome.passed,
                               severity=_SEVERITY[outcome.severity], metadata=metadata,
                               description=outcome.description[:2000])


def blocking_failure(task: TaskSpec, outcomes: list[CheckOutcome]) -> dg.Failure | None:
    """The failure that stops the tasks downstream: blocking checks of severity error that failed, with their items."""
    failed = [o for o in outcomes if o.blocking and o.severity == "error" and not o.passed]
    if not failed:
        return None
    said = "; ".join(f"{o.name}: {o.description}" for o in failed)
    items = [item["item"] for o in failed for item in o.metadata.get("failing_items", [])]
    return dg.Failure(f"task {task.name}: blocking check(s) failed, so the tasks downstream do not run: {said}",
                      metadata={"error_kind": "check", "failed_checks": dg.MetadataValue.json([o.name for o in failed]),
                                "failing_items": dg.MetadataValue.json(list(dict.fromkeys(items)))},
                      allow_retries=False)


def item_indices(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> list[int] | None:
    """Input index of each entry of a fan-out's value, from its latest item table, when the table lists every
    item: with `on_item_failure: skip` failed items are left out of the value, so positions and indices differ."""
    event = context.instance.get_latest_materialization_event(key)
    materialization = event.asset_materialization if event is not None else None
    if materialization is None or "item_table" not in materialization.metadata:
        return None
    rows = [record.data for record in materialization.metadata["item_table"].value.records]
    items = getattr(materialization.metadata.get("items"), "value", None)
    if items is not None and items != len(rows):
        return None  # the table shows the first items only
    return [int(row["index"]) for row in rows if row.get("status") in ("success", "skipped")]


def _judges(context: dg.AssetCheckExecutionContext, spec: WorkflowSpec, task: TaskSpec, value: Any,
            selected: set[str], indices: list[int] | None) -> dict[str, Judged]:
    """The verdicts of the task's selected judge checks, each answer scored through the call path."""
    wanted = [(c, n) for c, n in zip(task.checks, check_names(task.checks)) if c.type == "judge" and n in selected]
    if not wanted:
        return {}
    op_context = context.op_execution_context
    # The judge's calls are online, whatever the run's --mode: a check waits for its answers.
    scope = call_scope(op_context, spec, judge_task(spec, task), online=True)
    answers, _ = task_answers(task, value, indices)
    judged = {}
    try:
        for check, name in wanted:
            judged[name] = judge(chat_model(op_context), spec, task, check, name, answers, scope,
                                 should_stop=lambda: run_is_stopping(op_context))
    except LLMError as exc:
        raise dg.Failure(f"task {task.name}: judge check could not score the answers: {exc}",
                         metadata=failure_metadata(exc), allow_retries=exc.retryable) from None
    finally:
        settle_writes(scope)
    for name, result in judged.items():
        usage = result.usage
        context.log.info(f"{task.name}: judge check {name}: {usage.calls} call(s), {usage.cache_hits} cache hit(s), "
                         f"{usage.prompt_tokens}+{usage.completion_tokens} tokens, ${usage.cost_usd:.6f}")
    return judged


def build_task_checks(spec: WorkflowSpec, task: TaskSpec) -> dg.AssetChecksDefinition:
    """The asset checks of one task, run together in one step."""
    key = asset_key(spec, task.name)
    names = check_names(task.checks)
    specs = [dg.AssetCheckSpec(name, asset=key, blocking=check.blocking, description=describe_check(check),
                               metadata={"type": check.type, "severity": check.severity})
             for check, name in zip(task.checks, names)]
    judges = any(check.type == "judge" for check in task.checks)
    step = checks_step(spec.name, task.name)

    @dg.multi_asset_check(name=step, specs=specs, can_subset=True,
                          ins={"value": dg.AssetIn(key=key)},
                          required_resource_keys=set(PROMPT_RESOURCE_KEYS) if judges else None,
                          op_tags={WORKFLOW_TAG: spec.name}, description=f"Quality checks of {task.name}.")
    def task_checks(context: dg.AssetCheckExecutionContext, value: Any) -> Iterator[dg.AssetCheckResult]:
        def evaluate(_: dg.OpExecutionContext, __: Any) -> Iterator[dg.AssetCheckResult]:
            selected = {k.name for k in context.selected_asset_check_keys if k.asset_key == key}
            indices = item_indices(context, key) if task.for_each else None
            outcomes = evaluate_all(task, value, _judges(context, spec, task, value, selected, indices),
                                    only=selected, indices=indices)
            for outcome in outcomes:
                if not outcome.passed:
                    context.log.warning(f"{task.name}: check {outcome.name} failed ({outcome.severity}): "
                                        f"{outcome.description}")
                yield check_result(spec, task, outcome)
            failure = blocking_failure(task, outcomes)
            if failure is not None:
                raise failure

        # In its step span, with the judges' calls tallied (as the task's) for `stats` and the metrics.
        yield from observed(spec, step, evaluate, prompts=False, task=task.name)(context.op_execution_context, {})

    return task_checks


def build_asset_checks(spec: WorkflowSpec) -> list[dg.AssetChecksDefinition]:
    """The asset checks of every task of the workflow that declares `checks:`."""
    return [build_task_checks(spec, task) for task in spec.all_tasks() if task.checks]
