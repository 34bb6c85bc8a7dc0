"""A local run pays for its job and its summary once: one build of the job per run, and no throw-away in-memory
instance (each one an in-memory SQLite storage set up by alembic) to read the tasks' outputs back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mp_pipelines import definitions
from mp_pipelines_tests.workflow_helpers import run_file, write_workflow

WORKFLOW = """
name: overhead_probe
inputs:
  topic: {type: string, default: owls}
tasks:
  - name: outline
    prompt: "Outline a note on {{ inputs.topic }}"
  - name: note
    prompt: "Write the note from: {{ outline }}"
"""


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the workflow definitions built and the ephemeral instances made."""
    counts = {"builds": 0, "ephemeral": 0}
    build = definitions.build_definitions
    ephemeral = dg.DagsterInstance.ephemeral

    def counting_build(*args: Any, **kwargs: Any) -> dg.Definitions:
        counts["builds"] += 1
        return build(*args, **kwargs)

    def counting_ephemeral(*args: Any, **kwargs: Any) -> dg.DagsterInstance:
        counts["ephemeral"] += 1
        return ephemeral(*args, **kwargs)

    monkeypatch.setattr(definitions, "build_definitions", counting_build)
    monkeypatch.setattr(dg.DagsterInstance, "ephemeral", staticmethod(counting_ephemeral))
    monkeypatch.setenv("MP_LLM_PROVIDER", "simulated")
    return counts


def test_a_run_builds_its_job_once_and_reads_outputs_without_a_throwaway_instance(
        tmp_path: Path, instance: dg.DagsterInstance, counted: dict[str, int]) -> None:
    path = write_workflow(tmp_path, WORKFLOW)
    outcome = run_file(path, {"topic": "herons"}, instance)
    assert outcome.success, outcome.as_text()
    assert "herons" in str(outcome.tasks["outline"]["output"])  # outputs still read back through the IO manager
    assert outcome.tasks["note"]["output"]
    assert counted["builds"] == 1
    assert counted["ephemeral"] == 0


def test_outside_a_run_every_job_request_builds_afresh(tmp_path: Path, counted: dict[str, int]) -> None:
    path = str(write_workflow(tmp_path, WORKFLOW).resolve())
    first = definitions.get_job("overhead_probe", path, "v1")
    with definitions.jobs_built_once():
        inside = definitions.get_job("overhead_probe", path, "v1")
        assert definitions.get_job("overhead_probe", path, "v1") is inside
        assert definitions.get_job("overhead_probe", path, "v2") is not inside  # another version: built
    assert definitions.get_job("overhead_probe", path, "v1") is not inside
    assert first is not inside
    assert counted["builds"] == 4
