"""Sharded fan-out against a loopback endpoint: order, per-item records, item retries, breadth, limits, 429."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines.cli.reporting import step_states
from mp_pipelines.cli.running import run_config
from mp_pipelines.factory.names import is_mapped_step, mapped_step
from mp_pipelines.llm.simulated import SimulatedModel
from mp_pipelines.spec.models import RetrySpec, TaskSpec
from mp_pipelines.tasks.shards import MAX_STEPS_PER_FANOUT, retry_delay, shard_size
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import materializations, run_file, write_workflow


def fan_out(name: str, items: int, *, breadth: int = 8, shard: int | None = None, extra: str = "",
            task_extra: str = "") -> str:
    shard_line = f"\n    shard_size: {shard}" if shard else ""
    return f"""
name: {name}
breadth: {breadth}
{extra}
inputs:
  words: {{type: list, default: {[f"w{i:03d}" for i in range(items)]}}}
tasks:
  - name: echo
    for_each: inputs.words
    prompt: "Echo {{{{ item }}}}"{shard_line}{task_extra}
"""


@pytest.mark.parametrize("items, breadth, expected", [(1, 8, 1), (32, 8, 1), (33, 1, 4), (33, 8, 32), (100, 1, 4), (100, 8, 32),
                                                      (1000, 100, 400), (10_000, 8, 313), (10_000, 200, 800)])
def test_default_shard_size_keeps_steps_few(items: int, breadth: int, expected: int) -> None:
    task = TaskSpec(name="t", prompt="p", for_each="inputs.x")
    assert shard_size(task, items, breadth) == expected
    assert -(-items // expected) <= MAX_STEPS_PER_FANOUT
    assert shard_size(TaskSpec(name="t", prompt="p", for_each="inputs.x", shard_size=7), items, breadth) == 7


def test_retry_delay_follows_dagsters_formula_and_is_capped() -> None:
    assert retry_delay(RetrySpec(delay=1, backoff="exponential"), 3) == 7
    assert retry_delay(RetrySpec(delay=2, backoff="linear"), 3) == 6
    assert retry_delay(RetrySpec(delay=2, jitter="full"), 1, rand=lambda: 0.5) == 1
    assert retry_delay(RetrySpec(delay=1, jitter="plus_minus"), 1, rand=lambda: 0.0) == 0
    assert retry_delay(RetrySpec(delay=3000, backoff="exponential"), 5) == 3600


def test_large_fan_out_runs_in_few_steps_in_input_order(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    outcome = run_file(write_workflow(tmp_path, fan_out("wide", 100)), {}, instance)
    assert outcome.success, outcome.as_text()
    results = outcome.tasks["echo"]["output"]
    assert len(results) == 100
    assert all(f"Echo w{i:03d}" in r for i, r in enumerate(results))
    mapped = [key for key in step_states(instance, outcome.run_id) if is_mapped_step(key, "wide", "echo")]
    # 100 items at breadth 8: shards of 4 × breadth = 32 items
    assert sorted(mapped) == [mapped_step("wide", "echo", k) for k in ("0_31", "32_63", "64_95", "96_99")]
    assert outcome.usage.calls == 100
    (event,) = [e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "echo"]
    assert event.metadata["items"].value == 100 and event.metadata["shards"].value == 4
    assert event.metadata["calls"].value == 100


def test_shard_output_is_a_dataframe_of_item_records(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, fan_out("records", 6, shard=3))
    job = dg.build_reconstructable_job("mp_pipelines.definitions", "get_job",
                                       reconstructable_args=("records", str(path)))
    with dg.execute_job(job, instance=instance, run_config=run_config({}, "in_process")) as result:
        assert result.success
        shards = result.output_for_node("records__echo.echo")
    assert sorted(shards) == ["0_2", "3_5"]
    frame = shards["3_5"]
    assert list(frame["index"]) == [3, 4, 5]
    assert set(frame["status"]) == {"success"}
    assert {"output", "error", "attempts", "http_attempts", "prompt_tokens", "completion_tokens",
            "latency_s", "model", "provider"} <= set(frame.columns)
    assert (frame["prompt_tokens"] > 0).all() and (frame["attempts"] == 1).all()


def test_breadth_is_exact_inside_a_shard(llm_server_factory, monkeypatch, instance: dg.DagsterInstance,
                                         tmp_path: Path) -> None:
    server = llm_server_factory(model=SimulatedModel(latency=0.2))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    outcome = run_file(write_workflow(tmp_path, fan_out("narrow", 30, breadth=5, shard=30)), {}, instance)
    assert outcome.success
    assert server.in_flight.peak == 5  # concurrent, and never more than breadth
    assert len(server.requests) == 30


def test_workflow_limits_cap_calls_below_breadth(llm_server_factory, monkeypatch, instance: dg.DagsterInstance,
                                                 tmp_path: Path) -> None:
    server = llm_server_factory(model=SimulatedModel(latency=0.2))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    spec = fan_out("capped", 20, breadth=10, shard=20, extra="limits: {max_in_flight: 3, requests_per_minute: 600}")
    outcome = run_file(write_workflow(tmp_path, spec), {}, instance)
    assert outcome.success
    assert server.in_flight.peak == 3
    times = sorted(r.time for r in server.requests)
    assert times[-1] - times[0] >= 0.8  # 600/min: 10 at once, then 10 a second


def test_breadth_holds_across_shards_in_separate_processes(llm_server_factory, monkeypatch,
                                                           instance: dg.DagsterInstance, tmp_path: Path) -> None:
    server = llm_server_factory(model=SimulatedModel(latency=0.3))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    path = write_workflow(tmp_path, fan_out("spread", 12, breadth=4, shard=3))
    job = dg.build_reconstructable_job("mp_pipelines.definitions", "get_job", reconstructable_args=("spread", str(path)))
    config = run_config({}, None)
    config["execution"] = {"config": {"multiprocess": {}}}
    with dg.execute_job(job, instance=instance, run_config=config) as result:
        assert result.success
    assert 1 <= server.in_flight.peak <= 4
    assert len(server.requests) == 12


def test_failed_items_are_recorded_and_fail_the_shard(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                      tmp_path: Path) -> None:
    openai_env.faults.add(content="ok-0").add(status=400).add(content="ok-2")
    outcome = run_file(write_workflow(tmp_path, fan_out("partial", 3, breadth=1, shard=3)), {}, instance)
    assert not outcome.success
    error = outcome.tasks["echo"]["error"]
    assert "1 of 3 item(s) failed" in error and "[1]" in error and "HTTP 400" in error
    failure = instance.get_records_for_run(outcome.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records[0]
    metadata = failure.event_log_entry.dagster_event.step_failure_data.user_failure_data.metadata
    assert metadata["failed_items"].value == 1 and metadata["items"].value == 3


def test_item_retries_inside_a_shard_do_not_duplicate_results(openai_env: RunningServer,
                                                              instance: dg.DagsterInstance, tmp_path: Path) -> None:
    # item 0: the client's 3 attempts all get 500, then the task's retry succeeds
    openai_env.faults.add(status=500, times=3)
    spec = fan_out("retried", 4, breadth=1, shard=4,
                   task_extra="\n    retries: {max_retries: 2, delay: 0}")
    outcome = run_file(write_workflow(tmp_path, spec), {}, instance)
    assert outcome.success, outcome.as_text()
    results = outcome.tasks["echo"]["output"]
    assert len(results) == 4 and all(f"Echo w{i:03d}" in r for i, r in enumerate(results))
    assert len(openai_env.requests) == 3 + 4
    assert outcome.usage.calls == 4  # each item's successful call counted once


def test_429_burst_with_retry_after_is_honoured_and_the_run_succeeds(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(status=429, headers={"Retry-After": "1"}, times=4)
    outcome = run_file(write_workflow(tmp_path, fan_out("throttled", 20, breadth=4, shard=20)), {}, instance)
    assert outcome.success, outcome.as_text()
    assert len(outcome.tasks["echo"]["output"]) == 20
    assert len(openai_env.requests) == 24
    first_429 = openai_env.requests[0].time
    later = [r.time for r in openai_env.requests[4:]]
    assert min(later) - first_429 >= 0.9  # nobody called again before Retry-After had passed


def test_breadth_is_exact_across_concurrent_shards(llm_server_factory, monkeypatch, instance: dg.DagsterInstance,
                                                   tmp_path: Path) -> None:
    server = llm_server_factory(model=SimulatedModel(latency=0.2))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    path = write_workflow(tmp_path, fan_out("shared", 60, breadth=5, shard=6))
    outcome = run_file(path, {}, instance, executor=None)  # the job's own concurrent executor: shards overlap
    assert outcome.success, outcome.as_text()
    assert server.in_flight.peak == 5  # overlapping shards share one breadth semaphore
    assert len(server.requests) == 60
    shard_steps = [key for key in step_states(instance, outcome.run_id) if is_mapped_step(key, "shared", "echo")]
    assert len(shard_steps) == 10


@pytest.mark.parametrize(("preset", "expected"), [(None, 10_000), (500, 500)])
def test_the_shared_loop_calms_the_garbage_collector_once(preset: int | None, expected: int) -> None:
    """Full collections of a run worker's heap stalled the loop (~0.2 s each): starting the loop freezes what
    the process holds and collects the young generation less often, unless someone chose a threshold."""
    import subprocess
    import sys

    code = ("import gc\n"
            f"{'gc.set_threshold(%d)' % preset if preset else ''}\n"
            "from mp_pipelines.calls.loop import shared_loop\n"
            "before = gc.get_freeze_count()\n"
            "shared_loop(); shared_loop()\n"
            "print(gc.get_threshold()[0], gc.get_freeze_count() > before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [str(expected), "True"]
