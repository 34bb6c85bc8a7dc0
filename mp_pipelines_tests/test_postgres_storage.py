"""Workflows on a Dagster instance whose runs and event logs live in PostgreSQL (dagster-postgres)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines.running import run_workflow
from mp_pipelines.spec.loader import load_workflows
from mp_pipelines_tests.postgres import postgres_storage_config, temporary_database
from mp_pipelines_tests.workflow_helpers import materializations


@pytest.fixture
def pg_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance on a fresh PostgreSQL database (local folder only for compute logs and outputs)."""
    with temporary_database() as dbname:
        home = tmp_path / "pg_home"
        home.mkdir()
        overrides = {"storage": postgres_storage_config(dbname), "telemetry": {"enabled": False}}
        with dg.DagsterInstance.local_temp(str(home), overrides=overrides) as instance:
            yield instance


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
