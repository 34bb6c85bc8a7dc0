"""Every op of a generated job inside its step span, with its calls tallied for `mp-pipelines stats`.

`observed` wraps an op's compute function: the step's span (child of the run's span, see `telemetry.setup`) is the
current span while the op runs, so each model call's span, made on the shared event loop, is its child; the step's
tally goes out as `mp/calls` metadata on its first output (a checks step: its first check result) or else on its
failure, and the process's metrics are pushed when the step ends.
"""


import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from typing import Any, Callable

import dagster as dg

from mp_pipelines.factory.names import collect_step, items_step, keyed_step, task_of_step
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.telemetry import names as n
from mp_pipelines.telemetry.setup import RUN_WORKER_PIDS, Telemetry, active, run_parent
from mp_pipelines.telemetry.tally import TALLY_METADATA_KEY, StepTally, tallying

Compute = Callable[[dg.OpExecutionContext, Mapping[str, Any]], Iterator[Any]]


def observed(spec: WorkflowSpec, step: str, compute: Compute, *, prompts: bool, task: str | None = None) -> Compute:
    """`compute` inside its step span and tally (see the module docstring); `step` is the op's step key (without a
    mapping key); `prompts`: the op calls the model, so its failure is a failed item; `task`: the task the step
    is counted for, when its step key does not say it plainly (a checks step's key ends in `__checks`)."""
    task = task or task_of_step(step)
    collects = not prompts or step in (collect_step(spec.name, task), items_step(spec.name, task))

    def traced(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        telemetry = active()
        step_key = keyed_step(step, context.get_mapping_key())
        tally = StepTally(spec.name, task, telemetry)
        told = False
        try:
            with ExitStack() as stack:
                span = _step_span(stack, telemetry, context, spec, task, step_key)
                stack.enter_context(tallying(tally))
                try:
                    for event in compute(context, inputs):
                        if isinstance(event, dg.Output) and not told:
                            told = True
                            failures = 0 if collects else int(_raw(event.metadata.get("failed_items")) or 0)
                            _count_items(telemetry, spec, task, event.metadata, failures, collects)
                            event = _with_tally(event, tally, failures)
                        elif isinstance(event, dg.AssetCheckResult) and not told:  # a checks step (its judges)
                            told = True
                            event = _check_with_tally(event, tally)
                        yield event
                except dg.Failure as failure:
                    raise _told_failure(failure, span, tally, telemetry, spec, task, collects,
                                        told=told) from failure.__cause__
                finally:
                    if span is not None:
                        span.set_attribute(n.CALLS, sum(t.calls for t in tally.models.values()))
        finally:
            _finish(telemetry, tally)

    return traced


def _told_failure(failure: dg.Failure, span: Any, tally: StepTally, telemetry: Telemetry | None, spec: WorkflowSpec,
                  task: str, collects: bool, *, told: bool) -> dg.Failure:
    """The step's failure with its tally in the metadata (its failed items: 1 for a plain task), unless an event
    the step yielded before it already carries the tally (`told`: `stats` would count the calls twice)."""
    failures = 0 if collects else int(_raw(failure.metadata.get("failed_items")) or 1)
    if not collects:
        _count(telemetry, spec, task, "failed", failures)
    if span is not None:
        span.set_attribute(n.ATTRIBUTES["error_type"][0], str(_raw(failure.metadata.get("error_kind")) or "failure"))
    if told or (not tally.models and not failures):
        return failure
    return dg.Failure(failure.description, metadata={**failure.metadata,
                                                     TALLY_METADATA_KEY: tally.as_metadata(failures)},
                      allow_retries=failure.allow_retries)


def _finish(telemetry: Telemetry | None, tally: StepTally) -> None:
    """Count the step's calls in the metrics and send them (and, in a step process, the spans) on their way."""
    if telemetry is None:
        return
    if telemetry.metrics is not None:
        telemetry.metrics.record_step(tally, telemetry.names["provider"])
    if os.getpid() not in RUN_WORKER_PIDS:
        telemetry.flush()  # a step process (multiprocess executor) may exit without running atexit hooks
    elif telemetry.metrics is not None:
        telemetry.metrics.push()


def _step_span(stack: ExitStack, telemetry: Telemetry | None, context: dg.OpExecutionContext, spec: WorkflowSpec,
               task: str, step_key: str) -> Any:
    """The step's span, current until the stack closes (None when traces are off)."""
    if telemetry is None or telemetry.tracer is None:
        return None
    attributes = {n.RUN_ID: context.run_id, n.JOB: context.job_name, n.STEP: step_key, n.WORKFLOW: spec.name,
                  n.TASK: task}
    return stack.enter_context(telemetry.tracer.start_as_current_span(
        f"step {step_key}", context=run_parent(context.run_id), attributes=attributes))


def _raw(value: Any) -> Any:
    return getattr(value, "value", value)


def _with_tally(output: dg.Output, tally: StepTally, failures: int) -> dg.Output:
    if not tally.models and not failures:
        return output
    metadata = {**output.metadata, TALLY_METADATA_KEY: dg.MetadataValue.json(tally.as_metadata(failures))}
    return dg.Output(output.value, output_name=output.output_name, metadata=metadata,
                     data_version=output.data_version, tags=output.tags)


def _check_with_tally(result: dg.AssetCheckResult, tally: StepTally) -> dg.AssetCheckResult:
    if not tally.models:
        return result
    metadata = {**result.metadata, TALLY_METADATA_KEY: dg.MetadataValue.json(tally.as_metadata(0))}
    return dg.AssetCheckResult(passed=result.passed, asset_key=result.asset_key, check_name=result.check_name,
                               metadata=metadata, severity=result.severity, description=result.description)


def _count_items(telemetry: Telemetry | None, spec: WorkflowSpec, task: str, metadata: Mapping[str, Any],
                 failures: int, collects: bool) -> None:
    if telemetry is None or telemetry.metrics is None or collects:
        return
    if "items" in metadata:
        items = int(_raw(metadata["items"]))
        _count(telemetry, spec, task, "success", items - failures)
        _count(telemetry, spec, task, "failed", failures)
    elif any(key.startswith("llm/") for key in metadata):
        _count(telemetry, spec, task, "success", 1)


def _count(telemetry: Telemetry | None, spec: WorkflowSpec, task: str, status: str, count: int) -> None:
    if telemetry is not None and telemetry.metrics is not None:
        telemetry.metrics.items(spec.name, task, status, count)
