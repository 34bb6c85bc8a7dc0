"""Workflows against a real OpenAI-compatible HTTP endpoint on loopback: retries, timeouts, auth errors."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import materializations, run_file, write_workflow

ONE_TASK = """
name: one_task
tasks:
  - name: answer
    prompt: "Say hello to {{ inputs.who }}"
    retries: {max_retries: 2, delay: 0}
    timeout: 5
inputs:
  who: {type: string, default: world}
"""
FAKE_KEY = "sk-test-not-a-real-key"


def test_success_records_model_usage_and_provider(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                  tmp_path: Path) -> None:
    outcome = run_file(write_workflow(tmp_path, ONE_TASK), {"who": "Ada"}, instance)
    assert outcome.success
    assert outcome.provider == "openai"
    (request,) = openai_env.requests
    assert request.body["messages"] == [{"role": "user", "content": "Say hello to Ada"}]
    assert request.body["model"] == "gpt-4o-mini"
    (event,) = materializations(instance, outcome.run_id)
    assert event.metadata["provider"].value == "openai"
    assert event.metadata["calls"].value == 1
    assert event.metadata["prompt_tokens"].value > 0
    assert outcome.usage.calls == 1


def test_429_with_retry_after_then_success(openai_env: RunningServer, instance: dg.DagsterInstance,
                                           tmp_path: Path) -> None:
    openai_env.faults.add(status=429, headers={"Retry-After": "1"})
    outcome = run_file(write_workflow(tmp_path, ONE_TASK), {}, instance)
    assert outcome.success
    first, second = openai_env.requests
    assert second.time - first.time >= 0.9  # Retry-After honoured by the client
    records = instance.get_records_for_run(outcome.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT).records
    attempts = [r.event_log_entry.dagster_event.event_specific_data.metadata.get("attempts") for r in records]
    assert dg.MetadataValue.int(2) in attempts
    assert outcome.usage.calls == 1  # one successful call, however many HTTP attempts


def test_500_then_success(openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(status=500)
    outcome = run_file(write_workflow(tmp_path, ONE_TASK), {}, instance)
    assert outcome.success
    assert len(openai_env.requests) == 2


def test_exhausted_request_retries_fall_back_to_the_step_retry_policy(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(status=503, times=3)  # the client's 1 try + 2 retries all fail
    outcome = run_file(write_workflow(tmp_path, ONE_TASK), {}, instance)
    assert outcome.success, outcome.as_text()
    assert len(openai_env.requests) == 4
    retries = instance.get_records_for_run(outcome.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY).records
    assert len(retries) == 1


def test_timeout_fails_the_task_with_a_clear_error(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                   tmp_path: Path) -> None:
    spec = ONE_TASK.replace("timeout: 5", "timeout: 1").replace("max_retries: 2", "max_retries: 0")
    openai_env.faults.add(delay=3.0, times=5)
    outcome = run_file(write_workflow(tmp_path, spec), {}, instance)
    assert not outcome.success
    error = outcome.tasks["answer"]["error"]
    assert "answer" in error and "timeout" in error.lower()
    assert outcome.tasks["answer"]["status"] == "failed"


def test_authentication_error_is_clear_not_retried_and_never_shows_the_key(
        llm_server_factory, monkeypatch, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    server = llm_server_factory(api_key="sk-the-right-key")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    outcome = run_file(write_workflow(tmp_path, ONE_TASK), {}, instance)
    assert not outcome.success
    error = outcome.tasks["answer"]["error"]
    assert "OPENAI_API_KEY" in error
    assert len(server.requests) == 1  # neither the client nor Dagster retries a 401
    logs = instance.all_logs(outcome.run_id)
    dumped = json.dumps([str(entry) for entry in logs]) + json.dumps(outcome.as_json(), default=str)
    run = instance.get_run_by_id(outcome.run_id)
    dumped += json.dumps(run.run_config, default=str) + json.dumps(run.tags)
    assert FAKE_KEY not in dumped
