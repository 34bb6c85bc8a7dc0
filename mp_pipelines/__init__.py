"""mp-pipelines: declarative multi-step LLM prompt workflows that run as Dagster jobs.

`import mp_pipelines` stays light: `run_workflow` imports Dagster only when it is called, and `PromptWorkflow` (the
Dagster Component of `dg` projects, found by `dg` through this package's `dagster_dg_cli.registry_modules` entry
point) only when it is first looked up.
"""

from __future__ import annotations

from typing import Any


def run_workflow(spec_or_name: Any, inputs: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run a workflow (a WorkflowSpec, a WorkflowBuilder, a YAML path or a workflow name) and return the object
    `mp-pipelines run --json` prints: run_id, status, provider, tasks and usage.

    `options`: executor, max_cost_usd, max_tokens, max_calls, instance (a DagsterInstance; default: the CLI's,
    DAGSTER_HOME or ./.mp_pipelines/dagster_home), progress (a callable given each progress line), verbose.
    """
    from mp_pipelines.cli.api import run_workflow as run

    return run(spec_or_name, inputs, **options)


def __getattr__(name: str) -> Any:
    if name == "PromptWorkflow":
        from mp_pipelines.components import PromptWorkflow

        return PromptWorkflow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # dg lists a registry module's components from dir(module), so the lazy name must be listed here
    return sorted([*globals(), "PromptWorkflow"])


__all__ = ["PromptWorkflow", "run_workflow"]
