"""The run config of a workflow run, for local runs (`run`, `resume`) and runs launched on a webserver."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from mp_pipelines.factory.names import BUDGET_RESOURCE_KEY, EXECUTORS, INPUTS_OP, LLM_RESOURCE_KEY
from mp_pipelines.telemetry.logs import json_logs

CLI_CONSOLE_LOG_LEVEL = "WARNING"  # Dagster's console logger repeats every step event; the CLI prints its own progress


def run_config(inputs: Mapping[str, Any], executor: str | None = None, budget: Mapping[str, Any] | None = None, *,
               console_log_level: str | None = CLI_CONSOLE_LOG_LEVEL, mode: str | None = None) -> dict[str, Any]:
    """Run config for a workflow run: its inputs, the chosen executor, a budget and the console log level.

    `executor` is one of `EXECUTORS` (None: the job's default); `budget` ({max_cost_usd, max_tokens,
    max_calls}, None values unset) overrides the workflow's `budget:`; `console_log_level` None leaves
    Dagster's console logger as configured.
    """
    config: dict[str, Any] = {"ops": {INPUTS_OP: {"config": dict(inputs)}}}
    if console_log_level:
        try:
            level = "INFO" if json_logs() else console_log_level  # JSON lines are for a collector: all step lines
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        config["loggers"] = {"console": {"config": {"log_level": level}}}
    if executor:
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
        config["execution"] = {"config": {executor: {}}}
    return with_mode(with_budget(config, budget), mode)


def with_mode(config: Mapping[str, Any], mode: str | None) -> dict[str, Any]:
    """`config` with the run's call mode (`batch` or `online`) in resources.llm.config.mode, with the endpoint
    settings of this environment (see `llm_run_config`); None leaves it."""
    from mp_pipelines.llm.resource import llm_run_config

    if mode is None:
        return dict(config)
    resources = dict(config.get("resources") or {})
    resources[LLM_RESOURCE_KEY] = llm_run_config(mode)
    return {**config, "resources": resources}


def with_budget(config: Mapping[str, Any], budget: Mapping[str, Any] | None) -> dict[str, Any]:
    """`config` with the given budget fields (None: unset) over those it has in `resources.budget.config`."""
    given = {k: v for k, v in (budget or {}).items() if v is not None}
    if not given:
        return dict(config)
    resources = dict(config.get("resources") or {})
    current = (resources.get(BUDGET_RESOURCE_KEY) or {}).get("config") or {}
    flags = sorted({*current.get("from_flags", []), *given})  # named in the budget error
    resources[BUDGET_RESOURCE_KEY] = {"config": {**current, **given, "from_flags": flags}}
    return {**config, "resources": resources}
