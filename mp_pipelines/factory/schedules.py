"""A workflow's `schedule:` as a Dagster schedule that launches its job with the scheduled inputs."""

from __future__ import annotations

import dagster as dg

from mp_pipelines.factory.names import LLM_RESOURCE_KEY
from mp_pipelines.factory.partitions import inputs_run_config
from mp_pipelines.llm.resource import llm_run_config
from mp_pipelines.spec.models import WorkflowSpec


def schedule_run_config(spec: WorkflowSpec) -> dict:
    """Run config of a scheduled run: the schedule's inputs (defaults fill the rest)."""
    inputs = spec.schedule.inputs if spec.schedule else {}
    config: dict = inputs_run_config(spec, dict(inputs))
    if spec.schedule and spec.schedule.mode:  # the schedule's `mode:` for its runs
        config["resources"] = {LLM_RESOURCE_KEY: llm_run_config(spec.schedule.mode)}
    return config


def build_schedule(spec: WorkflowSpec,
                   job: dg.JobDefinition | dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition | None:
    """The schedule `<workflow>_schedule`, stopped unless the spec says `enabled: true`."""
    if spec.schedule is None:
        return None
    status = dg.DefaultScheduleStatus.RUNNING if spec.schedule.enabled else dg.DefaultScheduleStatus.STOPPED
    return dg.ScheduleDefinition(
        name=f"{spec.name}_schedule",
        cron_schedule=spec.schedule.cron,
        execution_timezone=spec.schedule.timezone,
        job=job,
        run_config=schedule_run_config(spec),
        default_status=status,
        description=f"Runs workflow {spec.name} on '{spec.schedule.cron}' ({spec.schedule.timezone}).",
    )
