"""The code location loads: every shipped workflow gives a job, assets and the LLM resource."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines import definitions
from mp_pipelines.llm.provider import provider_from_env
from mp_pipelines.llm.resource import LLMResource, build_llm_resource
from mp_pipelines.spec.loader import load_workflows

REPO = Path(__file__).resolve().parents[1]


def test_defs_have_a_job_and_assets_for_every_shipped_workflow() -> None:
    specs = load_workflows().specs
    defs = definitions.defs()
    for name, spec in specs.items():
        assert defs.resolve_job_def(name).name == name
        keys = {key for key in defs.resolve_asset_graph().get_all_asset_keys() if key.path[0] == name}
        expected = {dg.AssetKey([name, task.name]) for task in spec.all_tasks()}
        expected |= {dg.AssetKey([name, step.name]) for step in spec.tasks} | {dg.AssetKey([name, "inputs"])}
        assert keys == expected


def test_llm_resource_defaults_to_the_simulated_model() -> None:
    resource = build_llm_resource()
    assert isinstance(resource, LLMResource)
    assert resource.provider_name == "simulated"
    assert provider_from_env() == "simulated"


def test_llm_resource_reads_process_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_MAX_IN_FLIGHT", "12")
    monkeypatch.setenv("MP_REQUESTS_PER_MINUTE", "600")
    settings = build_llm_resource().limit_settings()
    assert (settings.max_in_flight, settings.requests_per_minute, settings.tokens_per_minute) == (12, 600.0, None)


def test_llm_resource_reads_the_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert provider_from_env() == "openai"
    job = definitions.build_definitions(load_workflows()).resolve_job_def("research_report")
    resource = job.resource_defs["llm"]
    assert "sk-from-env" not in repr(resource)  # an EnvVar, resolved only at run time


def test_bad_workflow_files_do_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "broken.yaml").write_text("name: broken\ntasks: [{name: a, prompt: '{{ nope }}'}]\n")
    (tmp_path / "extra.yaml").write_text("name: extra\ntasks: [{name: a, prompt: hello}]\n")
    monkeypatch.setenv("MP_WORKFLOWS_PATH", str(tmp_path))
    built = definitions.build_definitions(load_workflows())
    assert built.resolve_job_def("extra").name == "extra"
    assert built.resolve_job_def("research_report").name == "research_report"
    assert "broken.yaml" in caplog.text and "nope" in caplog.text


def test_dagster_definitions_validate_passes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    completed = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Validation successful for code location mp_pipelines.definitions:defs" in completed.stderr + completed.stdout
