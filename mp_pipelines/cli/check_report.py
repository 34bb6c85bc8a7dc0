"""What a run's quality checks said, per task, from its ASSET_CHECK_EVALUATION events (see factory/checks.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from mp_pipelines.calls.usage import Usage
from mp_pipelines.cli.reporting import StepState
from mp_pipelines.factory.names import checks_step
from mp_pipelines.spec.models import WorkflowSpec

_USAGE_KEYS = ("calls", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd")


def _plain(value: Any) -> Any:
    """A metadata value as JSON-ready data."""
    raw = getattr(value, "value", value)
    return raw if isinstance(raw, (str, int, float, bool, list, dict, type(None))) else str(raw)


def check_evaluations(instance: dg.DagsterInstance, run_id: str, spec: WorkflowSpec) -> dict[str, list[dict[str, Any]]]:
    """Task → [{name, passed, severity, metadata, description}] of the checks evaluated in the run, in run order."""
    found: dict[str, list[dict[str, Any]]] = {}
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
                                           limit=1_000_000).records
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if evaluation is None or list(evaluation.asset_key.path[:1]) != [spec.name]:
            continue
        found.setdefault(evaluation.asset_key.path[-1], []).append({
            "name": evaluation.check_name, "passed": bool(evaluation.passed),
            "severity": "warn" if evaluation.severity == dg.AssetCheckSeverity.WARN else "error",
            "metadata": {key: _plain(value) for key, value in evaluation.metadata.items()},
            "description": evaluation.description or "",
        })
    return found


def attach_checks(tasks: dict[str, dict[str, Any]], evaluations: Mapping[str, list[dict[str, Any]]],
                  spec: WorkflowSpec, states: Mapping[str, StepState]) -> Usage:
    """Put each task's check results in its summary (`checks`, and `checks_error` when its checks step failed
    for another reason than a failed check); return what the checks' model calls (judges) used."""
    usage = Usage()
    for task in spec.all_tasks():
        if not task.checks or task.name not in tasks:
            continue
        results = list(evaluations.get(task.name, []))
        tasks[task.name]["checks"] = results
        for result in results:
            numbers = {key: result["metadata"].get(key) or 0 for key in _USAGE_KEYS}
            usage = usage + Usage(**{k: (float(v) if k == "cost_usd" else int(v)) for k, v in numbers.items()})
        state = states.get(checks_step(spec.name, task.name))
        if state is not None:  # the calls of a judge step that failed: all of them, from its tally, when it has one
            usage = usage + (state.tallied if state.tallied is not None else state.usage)
            if state.status == "failed" and state.error:
                tasks[task.name]["checks_error"] = state.error
    return usage


def failed_check_lines(task: Mapping[str, Any], limit: int = 10) -> list[str]:
    """One line per failed check of a task summary, for `mp-pipelines run`'s text output."""
    lines = []
    for result in [r for r in task.get("checks") or [] if not r["passed"]][:limit]:
        lines.append(f"      check {result['name']} failed ({result['severity']}): {result.get('description', '')}")
    if task.get("checks_error") and not any(not r["passed"] for r in task.get("checks") or []):
        lines.append(f"      checks failed: {task['checks_error']}")
    return lines
