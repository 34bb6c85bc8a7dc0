"""The concurrent executor against the behaviours it promises: overlap, limits, retries, pools, failures,
termination, hooks and compute logs. Jobs live in executor_jobs.py; runs go through `dg.execute_job`."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mp_pipelines_tests import executor_jobs
from mp_pipelines_tests.executor_jobs import POOL, peak_concurrency

ET = dg.DagsterEventType
TERMINAL = {ET.STEP_SUCCESS, ET.STEP_FAILURE, ET.STEP_UP_FOR_RETRY}


def run_config(count: int, seconds: float, counter: Path | None = None, **execution: Any) -> dict[str, Any]:
    """Run config for the fan-out jobs: `count` items sleeping `seconds`, executor options as keywords."""
    return {
        "execution": {"config": execution},
        "ops": {"emit": {"config": {"count": count}},
                "sleep_item": {"config": {"seconds": seconds, "counter": str(counter or "")}}},
    }


def events_of(instance: dg.DagsterInstance, run_id: str, event_type: dg.DagsterEventType) -> list[dg.EventLogEntry]:
    """Events of one type in storage order."""
    return list(instance.all_logs(run_id, of_type=event_type))


def step_intervals(instance: dg.DagsterInstance, run_id: str, prefix: str) -> dict[str, tuple[float, float]]:
    """Step key → (STEP_START, terminal event) timestamps, for steps whose key starts with `prefix`."""
    starts = {e.step_key: e.timestamp for e in events_of(instance, run_id, ET.STEP_START)}
    ends = {e.step_key: e.timestamp for t in TERMINAL for e in events_of(instance, run_id, t)}
    return {key: (starts[key], ends[key]) for key in starts if key and key.startswith(prefix) and key in ends}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, delta in edges:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def assert_step_sequences_well_formed(instance: dg.DagsterInstance, run_id: str) -> None:
    """Each step's events start with STEP_START, end in one terminal event, and only hooks follow it."""
    sequences: dict[str, list[dg.DagsterEventType]] = defaultdict(list)
    for entry in instance.all_logs(run_id):
        if entry.dagster_event and entry.step_key and entry.dagster_event.is_step_event:
            sequences[entry.step_key].append(entry.dagster_event.event_type)
    for key, sequence in sequences.items():
        lifecycle = [t for t in sequence if t not in (ET.HOOK_COMPLETED, ET.HOOK_SKIPPED, ET.HOOK_ERRORED)]
        assert lifecycle[0] == ET.STEP_START, (key, sequence)
        assert [t for t in lifecycle if t in TERMINAL] == [lifecycle[-1]], (key, sequence)


def test_steps_run_concurrently_and_each_keeps_its_own_context(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    with dg.execute_job(dg.reconstructable(executor_jobs.fanout_job), instance=instance,
                        run_config=run_config(20, 0.5, counter)) as result:
        assert result.success
        assert result.output_for_node("collect") == list(range(20))
        per_item = result.output_for_node("sleep_item")
    # Each mapped step saw its own mapping key and step key, not a neighbour's.
    assert {key: (value["mapping_key"], value["step_key"]) for key, value in per_item.items()} == {
        str(i): (str(i), f"sleep_item[{i}]") for i in range(20)}

    intervals = list(step_intervals(instance, result.run_id, "sleep_item[").values())
    assert len(intervals) == 20
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    assert span < 7.5, f"20 × 0.5 s steps took {span:.1f} s: not concurrent (serial is ≥ 10 s)"
    assert max_overlap(intervals) >= 10
    assert peak_concurrency(counter) >= 10
    assert_step_sequences_well_formed(instance, result.run_id)


def test_max_concurrent_is_never_exceeded(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    result = dg.execute_job(dg.reconstructable(executor_jobs.fanout_job), instance=instance,
                            run_config=run_config(9, 0.3, counter, max_concurrent=3))
    assert result.success
    assert peak_concurrency(counter) == 3  # reached, never passed
    assert max_overlap(list(step_intervals(instance, result.run_id, "").values())) <= 3


def test_tag_concurrency_limits_cap_tagged_steps(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    limits = [{"key": "kind", "value": "llm", "limit": 2}]
    result = dg.execute_job(dg.reconstructable(executor_jobs.fanout_job), instance=instance,
                            run_config=run_config(6, 0.3, counter, tag_concurrency_limits=limits))
    assert result.success
    assert peak_concurrency(counter) == 2


def test_delayed_retry_reruns_the_step_while_other_steps_keep_running(instance: dg.DagsterInstance) -> None:
    with dg.execute_job(dg.reconstructable(executor_jobs.retry_job), instance=instance) as result:
        assert result.success
        assert result.output_for_node("flaky") == "recovered"
    [retry] = events_of(instance, result.run_id, ET.STEP_UP_FOR_RETRY)
    [restart] = events_of(instance, result.run_id, ET.STEP_RESTARTED)
    assert restart.timestamp - retry.timestamp >= 1.4  # the policy's 1.5 s delay, less timestamp jitter
    chain_starts = [e.timestamp for e in events_of(instance, result.run_id, ET.STEP_START)
                    if e.step_key and e.step_key.startswith("tick")]
    assert sum(retry.timestamp < t < restart.timestamp for t in chain_starts) >= 2


def test_failing_step_fails_the_run_while_other_steps_finish(instance: dg.DagsterInstance) -> None:
    config = {"ops": {"emit": {"config": {"count": 6}}, "maybe_fail": {"config": {"seconds": 0.5}}}}
    with dg.execute_job(dg.reconstructable(executor_jobs.failing_job), instance=instance,
                        run_config=config) as result:
        assert not result.success
        assert result.output_for_node("maybe_fail") == {str(i): i * 10 for i in range(6) if i != 3}
        assert result.output_for_node("slow_sibling") == "done"
    failures = events_of(instance, result.run_id, ET.STEP_FAILURE)
    assert [e.step_key for e in failures] == ["maybe_fail[3]"]
    assert "boom from item 3" in failures[0].dagster_event.step_failure_data.error.to_string()
    [run_failure] = events_of(instance, result.run_id, ET.RUN_FAILURE)
    assert "maybe_fail[3]" in run_failure.message
    sibling_end = step_intervals(instance, result.run_id, "slow_sibling")["slow_sibling"][1]
    assert sibling_end > failures[0].timestamp  # kept running after the failure
    assert not [e for e in events_of(instance, result.run_id, ET.STEP_START) if e.step_key == "collect_ints"]
    assert_step_sequences_well_formed(instance, result.run_id)


@pytest.mark.parametrize("require_upstream_step_success", [True, False])
def test_step_dependency_config(instance: dg.DagsterInstance, require_upstream_step_success: bool) -> None:
    config = {"execution": {"config": {"step_dependency_config": {
        "require_upstream_step_success": require_upstream_step_success}}}}
    result = dg.execute_job(dg.reconstructable(executor_jobs.early_output_job), instance=instance, run_config=config)
    assert not result.success
    [producer_failure] = events_of(instance, result.run_id, ET.STEP_FAILURE)
    assert producer_failure.step_key == "produce_then_fail"
    consumer = step_intervals(instance, result.run_id, "consume")
    if require_upstream_step_success:
        assert consumer == {}
    else:  # ran on the producer's output while the producer was still working
        assert "consume" in consumer
        assert consumer["consume"][0] < producer_failure.timestamp
        assert [e.step_key for e in events_of(instance, result.run_id, ET.STEP_SUCCESS)] == ["consume"]


def test_hooks_compute_logs_and_step_logs_belong_to_their_steps(instance: dg.DagsterInstance) -> None:
    result = dg.execute_job(dg.reconstructable(executor_jobs.hooked_fanout_job), instance=instance,
                            run_config=run_config(5, 0.2))
    assert result.success
    step_keys = {"emit", "collect", *(f"sleep_item[{i}]" for i in range(5))}
    hooked = [e.step_key for e in events_of(instance, result.run_id, ET.HOOK_COMPLETED)]
    assert sorted(hooked) == sorted(step_keys)
    hook_logs = {e.step_key: e.user_message for e in instance.all_logs(result.run_id)
                 if e.user_message.startswith("hook saw ")}
    assert hook_logs == {key: f"hook saw {key}" for key in step_keys}

    [captured] = events_of(instance, result.run_id, ET.LOGS_CAPTURED)
    data = captured.dagster_event.logs_captured_data
    assert data.step_keys == ["emit"]  # steps known when the run starts, as with the in-process executor
    log_key = instance.compute_log_manager.build_log_key_for_run(result.run_id, data.file_key)
    stdout = instance.compute_log_manager.get_log_data(log_key).stdout.decode()
    for i in range(5):
        assert f"stdout from item {i}" in stdout


def test_max_concurrent_below_one_fails_the_run_with_a_clear_error(instance: dg.DagsterInstance) -> None:
    result = dg.execute_job(dg.reconstructable(executor_jobs.fanout_job), instance=instance,
                            run_config=run_config(1, 0.0, max_concurrent=0))
    assert not result.success
    [failure] = events_of(instance, result.run_id, ET.RUN_FAILURE)
    assert "max_concurrent must be at least 1, got 0" in failure.dagster_event.job_failure_data.error.message


# ---------------------------------------------------------------------------------------------------
# Runs in child processes, as run workers: pools across runs, termination.


def start_child_run(instance: dg.DagsterInstance, job_name: str, config: dict[str, Any], tags: dict[str, str]
                    ) -> subprocess.Popen:
    """Start `executor_jobs.run_in_child` in a new Python process on the same instance."""
    code = "from mp_pipelines_tests.executor_jobs import run_in_child; run_in_child()"
    args = [job_name, dg.serialize_value(instance.get_ref()), json.dumps(config), json.dumps(tags)]
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    """Poll `condition()` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_tagged(instance: dg.DagsterInstance, tag: str) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"test/case": tag}))
    return runs[0] if runs else None


def pool_config(tmp_path: Path, counter: Path) -> dict[str, Any]:
    """Two runs' worth of `pool_job` config: 4 pooled items × 1 s each, released together by a barrier."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    return {"ops": {"emit": {"config": {"count": 4, "barrier": str(barrier), "parties": 2}},
                    "pooled_item": {"config": {"seconds": 1.0, "counter": str(counter)}}}}


def assert_overlapping_runs_shared_the_pool(instance: dg.DagsterInstance, run_ids: list[str], counter: Path) -> None:
    """Both runs succeeded at the same time, and their 8 pooled steps never held more than the pool's 2 slots."""
    windows = []
    for run_id in run_ids:
        [started] = events_of(instance, run_id, ET.RUN_START)
        [finished] = events_of(instance, run_id, ET.RUN_SUCCESS)
        windows.append((started.timestamp, finished.timestamp))
    (start_a, end_a), (start_b, end_b) = windows
    assert start_a < end_b and start_b < end_a, "the two runs did not overlap"
    # Both runs launch their pooled steps together after the barrier: a per-run limit would allow 4.
    assert peak_concurrency(counter) == 2
    assert instance.event_log_storage.get_concurrency_info(POOL).active_slot_count == 0



def test_pool_limits_ops_across_two_simultaneous_run_workers(tmp_path: Path) -> None:
    """Two run-worker processes sharing a pool, on PostgreSQL with the pooled storage of deploy/dagster.yaml.

    Not on SQLite: there Dagster 1.13.27's slot claim (SELECT, then UPDATE, in pysqlite's autocommit-until-write
    mode) can hand one slot to two processes that claim at the same instant, whatever the executor. Stock
    dagster-postgres can too, under load (its SELECT … FOR UPDATE runs in AUTOCOMMIT, so the lock is gone
    before the UPDATE; seen as 3 steps in a pool of 2); `mp_pipelines.storage` claims with one UPDATE.
    """
    from mp_pipelines_tests.postgres import postgres_storage_config, temporary_database

    with temporary_database() as dbname:
        storage = {"custom": {"module": "mp_pipelines.storage", "class": "PooledPostgresStorage",
                              "config": postgres_storage_config(dbname)["postgres"]}}
        (tmp_path / "home").mkdir()
        with dg.DagsterInstance.local_temp(str(tmp_path / "home"),
                                           overrides={"storage": storage, "telemetry": {"enabled": False}}) as pg_instance:
            pg_instance.event_log_storage.set_concurrency_slots(POOL, 2)
            counter = tmp_path / "counter"
            config = pool_config(tmp_path, counter)
            tags = [str(uuid.uuid4()) for _ in range(2)]
            children = [start_child_run(pg_instance, "pool_job", config, {"test/case": tag}) for tag in tags]
            for child in children:
                out, err = child.communicate(timeout=120)
                assert child.returncode == 0, err[-3000:]
                assert json.loads(out.strip().splitlines()[-1])["success"]
            run_ids = [run.run_id for tag in tags if (run := run_tagged(pg_instance, tag))]
            assert_overlapping_runs_shared_the_pool(pg_instance, run_ids, counter)


@pytest.mark.parametrize("canceling", [True, False], ids=["terminate", "bare-interrupt"])
def test_termination_stops_the_run_promptly(instance: dg.DagsterInstance, canceling: bool) -> None:
    """SIGINT is how Dagster's run launchers deliver termination to a run worker (after marking it CANCELING)."""
    tag = str(uuid.uuid4())
    child = start_child_run(instance, "fanout_job", run_config(4, 30.0), {"test/case": tag})
    try:
        run = wait_for(lambda: run_tagged(instance, tag), 60, "the run to be created")
        wait_for(lambda: len([e for e in events_of(instance, run.run_id, ET.STEP_START)
                              if e.step_key.startswith("sleep_item[")]) == 4, 60, "four steps in flight")
        if canceling:
            instance.report_run_canceling(run)
        interrupted_at = time.monotonic()
        os.kill(child.pid, signal.SIGINT)
        child.wait(timeout=20)
        elapsed = time.monotonic() - interrupted_at
    finally:
        if child.poll() is None:
            child.kill()
    assert elapsed < 5.0, f"run worker took {elapsed:.1f} s to stop with ops blocked for 30 s"

    final = instance.get_run_by_id(run.run_id)
    assert final.status == (dg.DagsterRunStatus.CANCELED if canceling else dg.DagsterRunStatus.FAILURE)
    failures = events_of(instance, run.run_id, ET.STEP_FAILURE)
    assert sorted(e.step_key for e in failures) == [f"sleep_item[{i}]" for i in range(4)]
    for failure in failures:
        assert failure.dagster_event.step_failure_data.error.cls_name == "DagsterExecutionInterruptedError"
    assert not [e for e in events_of(instance, run.run_id, ET.STEP_SUCCESS) if e.step_key != "emit"]


def test_termination_frees_the_pool_slots_of_in_flight_steps(instance: dg.DagsterInstance) -> None:
    instance.event_log_storage.set_concurrency_slots(POOL, 2)
    tag = str(uuid.uuid4())
    config = {"ops": {"emit": {"config": {"count": 4}}, "pooled_item": {"config": {"seconds": 30.0}}}}
    child = start_child_run(instance, "pool_job", config, {"test/case": tag})
    try:
        run = wait_for(lambda: run_tagged(instance, tag), 60, "the run to be created")
        wait_for(lambda: instance.event_log_storage.get_concurrency_info(POOL).active_slot_count == 2, 60,
                 "two pooled steps holding the pool's slots")
        instance.report_run_canceling(run)
        os.kill(child.pid, signal.SIGINT)
        child.wait(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
    info = instance.event_log_storage.get_concurrency_info(POOL)
    assert (info.active_slot_count, info.pending_step_count) == (0, 0)  # nothing left claimed or queued
    assert len(events_of(instance, run.run_id, ET.STEP_FAILURE)) == 2  # the two holders; the others never started


def test_a_forkserver_of_another_environment_is_replaced_unless_a_run_still_uses_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A multiprocess run starting after the environment changed lets the forkserver go (its executor starts a new
    one), unless a run still has step processes on it: then it spawns its own."""
    import multiprocessing.forkserver

    from mp_pipelines.dagster_ext.forkserver import _claim, _release

    server = multiprocessing.forkserver._forkserver
    monkeypatch.setenv("MP_TEST_ENVIRONMENT", "first")
    assert _claim()  # a run here, on a forkserver of this environment
    multiprocessing.forkserver.ensure_running()
    started = server._forkserver_pid
    monkeypatch.setenv("MP_TEST_ENVIRONMENT", "second")
    assert not _claim(), "the first run still uses the forkserver: the second spawns"
    assert server._forkserver_pid == started
    _release()
    assert _claim(), "nothing uses it any more: it is let go, the run's executor starts one of this environment"
    assert server._forkserver_pid is None
    _release()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{started}").exists() and time.monotonic() < deadline:  # it exits, and is reaped
        time.sleep(0.05)
    assert not Path(f"/proc/{started}").exists()
    multiprocessing.forkserver.ensure_running()  # a new one starts where the old one was
    assert server._forkserver_pid not in (None, started)
