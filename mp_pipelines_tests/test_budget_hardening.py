"""Budgets that must hold or refuse, cost priced when the endpoint renames the model, and fan-outs that fail when
nothing succeeded: real jobs against the loopback endpoint over the openai client."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from click.testing import CliRunner

from mp_pipelines.cli.main import main
from mp_pipelines.cli.running import LOCAL_HOME
from mp_pipelines.factory.names import collect_step, mapped_step
from mp_pipelines.llm.simulated import SimulatedModel
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import fan_workflow, run_file, write_workflow


def fan(name: str, items: int, *, breadth: int = 4, model: str = "gpt-4o-mini", extra: str = "",
        task_extra: str = "") -> str:
    return fan_workflow(name, [f"w{i:03d}" for i in range(items)], breadth=breadth,
                        defaults=f"{{model: {model}, temperature: 0}}", extra=extra, task_extra=task_extra)


def use_server(server: RunningServer, monkeypatch: pytest.MonkeyPatch, key: str = "sk-test-hardening") -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", key)


def step_failures(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key → the failure's message, for every failed step of the run."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    return {r.event_log_entry.dagster_event.step_key: r.event_log_entry.dagster_event.step_failure_data.error.message
            for r in records}


def execute(path: Path, instance: dg.DagsterInstance, executor: dict[str, Any] | None = None) -> str:
    """Run the job of `path` through Dagster directly (no CLI pre-flight) and return its run id."""
    from mp_pipelines.cli.config import run_config
    from mp_pipelines.definitions import reconstructable_job
    from mp_pipelines.spec.loader import load_workflow_file

    config = run_config({}, None)
    if executor is not None:
        config["execution"] = {"config": executor}
    with dg.execute_job(reconstructable_job(load_workflow_file(path), str(path)), instance=instance,
                        run_config=config) as result:
        return result.run_id


def cli_instance(folder: Path) -> dg.DagsterInstance:
    """The local instance the CLI used in `folder`."""
    return dg.DagsterInstance.local_temp(str(folder / LOCAL_HOME), overrides={"telemetry": {"enabled": False}})


# -- a budget holds across processes or the run refuses to start --

def test_a_budget_without_a_store_fails_multiprocess_steps_before_any_call(
        llm_server: RunningServer, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance,
        tmp_path: Path) -> None:
    """Each step process of the multiprocess executor would keep its own account: every prompt step refuses."""
    use_server(llm_server, monkeypatch)
    monkeypatch.setenv("MP_CACHE_URL", "none")
    path = write_workflow(tmp_path, fan("split", 12, extra="budget: {max_calls: 5}", task_extra="\n    shard_size: 4"))
    run_id = execute(path, instance, {"multiprocess": {}})
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert len(llm_server.requests) == 0, "no call may go out under a budget nothing can enforce"
    failures = step_failures(instance, run_id)
    assert set(failures) == {mapped_step("split", "echo", k) for k in ("0_3", "4_7", "8_11")}
    message = failures[mapped_step("split", "echo", "0_3")]
    assert "max_calls" in message and "MP_CACHE_URL is 'none'" in message
    assert "set MP_CACHE_URL to a reachable database" in message and "concurrent executor" in message

    # One process holds the whole run: there the account in memory is the run's, and it is exact.
    run_id = execute(path, instance)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert len(llm_server.requests) == 5
    assert "max_calls of 5 reached" in step_failures(instance, run_id)[collect_step("split", "echo")]


@pytest.mark.parametrize("cache_url, reason", [
    ("none", "MP_CACHE_URL is 'none'"),
    ("postgresql://nobody@127.0.0.1:1/nowhere", "cannot be opened"),
])
def test_the_cli_refuses_a_budgeted_multiprocess_run_without_a_shared_account(
        cache_url: str, reason: str, llm_server: RunningServer, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    use_server(llm_server, monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MP_CACHE_URL", cache_url)
    path = write_workflow(tmp_path, fan("refused", 12, task_extra="\n    shard_size: 4"))
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "multiprocess", "--max-calls", "5"])
    assert result.exit_code == 2, result.output
    assert reason in result.output and "set MP_CACHE_URL to a reachable database" in result.output
    assert "Traceback" not in result.output
    assert len(llm_server.requests) == 0
    with cli_instance(tmp_path) as instance:
        assert instance.get_runs() == [], "a refused run is never started"


# -- cost is priced by the requested model when the endpoint's name is unknown --

class ProviderPrefixedModel(SimulatedModel):
    """The simulated model behind a gateway that reports `openai/<model>` instead of the model asked for."""

    def completion(self, body: dict[str, Any], content: str | None = None) -> dict[str, Any]:
        answer = super().completion(body, content)
        answer["model"] = f"openai/{answer['model']}"
        return answer


def test_a_provider_prefixed_model_name_is_priced_as_the_requested_model(
        llm_server_factory, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mp_pipelines.calls.pricing")
    server = llm_server_factory(model=ProviderPrefixedModel())
    use_server(server, monkeypatch)
    path = write_workflow(tmp_path, fan("gateway", 20, breadth=2, model="gpt-4o", extra="budget: {max_cost_usd: 0.001}",
                                        task_extra="\n    shard_size: 20"))
    outcome = run_file(path, {}, instance, executor=None)
    assert not outcome.success, "the cost budget applies to calls the endpoint reports under another name"
    assert "max_cost_usd of $0.001 reached" in outcome.tasks["echo"]["error"]
    assert 0 < len(server.requests) < 20 and outcome.usage.cost_usd > 0
    warnings = [r.getMessage() for r in caplog.records if "'openai/gpt-4o'" in r.getMessage()]
    assert len(warnings) == 1 and "priced as 'gpt-4o'" in warnings[0], warnings


def test_a_cost_budget_refuses_a_model_without_a_price_before_any_call(
        llm_server: RunningServer, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance,
        tmp_path: Path) -> None:
    use_server(llm_server, monkeypatch)
    monkeypatch.chdir(tmp_path)
    path = write_workflow(tmp_path, fan("unpriced", 3, model="house-llama", extra="budget: {max_cost_usd: 0.01}"))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "model 'house-llama' has no price" in result.output and "MP_PRICES_FILE" in result.output
    assert "Traceback" not in result.output
    # Launched some other way (the UI, a schedule), the prompt steps refuse before their first call.
    run_id = execute(path, instance)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert "model 'house-llama' has no price" in step_failures(instance, run_id)[mapped_step("unpriced", "echo", "0")]
    assert len(llm_server.requests) == 0


# -- a fan-out where nothing succeeded fails --

def test_a_skipping_fan_out_with_no_success_fails_unless_zero_is_explicitly_allowed(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(status=400, times=3)
    outcome = run_file(write_workflow(tmp_path, fan("hopeless", 3, extra="on_item_failure: skip")), {}, instance)
    assert not outcome.success
    error = outcome.tasks["echo"]["error"]
    assert "0 of 3 item(s) succeeded" in error and "min_success_ratio: 0" in error

    openai_env.faults.add(status=400, times=3)
    text = fan("tolerant", 3, extra="on_item_failure: skip\nmin_success_ratio: 0")
    allowed = run_file(write_workflow(tmp_path, text), {}, instance)
    assert allowed.success, allowed.as_text()
    assert [f["index"] for f in allowed.tasks["echo"]["failed_items"]] == [0, 1, 2]


def test_an_authentication_error_stops_the_fan_out_at_once(
        llm_server_factory, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    server = llm_server_factory(api_key="sk-test-the-key-the-server-wants")
    use_server(server, monkeypatch, key="sk-test-a-key-it-refuses")
    path = write_workflow(tmp_path, fan("locked_out", 12, breadth=2, extra="on_item_failure: skip\nmin_success_ratio: 0",
                                        task_extra="\n    shard_size: 12"))
    outcome = run_file(path, {}, instance, executor=None)
    assert not outcome.success, "no item can succeed with a refused key: skipping them one by one is pointless"
    assert "check OPENAI_API_KEY" in outcome.tasks["echo"]["error"]
    assert 1 <= len(server.requests) <= 2, "only the calls already in flight (breadth 2) were made"
