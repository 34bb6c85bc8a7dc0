"""One workflow's definitions: its assets, the job over them and its optional schedule."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mp_pipelines.factory.assets import build_assets
from mp_pipelines.factory.checks import build_asset_checks
from mp_pipelines.factory.job import build_job_definition
from mp_pipelines.factory.schedules import build_schedule
from mp_pipelines.spec.models import WorkflowSpec


def build_workflow_definitions(spec: WorkflowSpec, *, provider: str = "simulated",
                               base_dir: Path | None = None) -> dg.Definitions:
    """Everything one workflow contributes to the code location; `provider` names the LLM provider runs use."""
    assets = build_assets(spec, provider=provider, base_dir=base_dir)
    job = build_job_definition(spec, assets, provider)
    schedule = build_schedule(spec, job)
    return dg.Definitions(jobs=[job], assets=assets, schedules=[schedule] if schedule else [],
                          asset_checks=build_asset_checks(spec))
