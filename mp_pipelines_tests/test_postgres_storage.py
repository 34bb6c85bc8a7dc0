"""Workflows on a Dagster instance whose runs and event logs live in PostgreSQL (dagster-postgres)."""

from __future__ import annotations

import dagster as dg

from mp_pipelines.cli.running import run_workflow
from mp_pipelines.spec.loader import load_workflows
from mp_pipelines_tests.workflow_helpers import materializations


def test_workflow_runs_on_postgres_storage(pg_instance: dg.DagsterInstance) -> None:
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PostgresEventLogStorage)
    spec = load_workflows().specs["research_report"]
    outcome = run_workflow(spec, {"topic": "geothermal", "max_questions": 3}, executor=None, instance=pg_instance)
    assert outcome.success, outcome.as_text()
    assert len(outcome.tasks["research"]["output"]) == 3
    keys = {tuple(e.asset_key.path) for e in materializations(pg_instance, outcome.run_id)}
    assert ("research_report", "report") in keys
    # the asset catalog on PostgreSQL knows the latest materialization of each task
    latest = pg_instance.get_latest_materialization_event(dg.AssetKey(["research_report", "plan"]))
    assert latest is not None and latest.run_id == outcome.run_id
