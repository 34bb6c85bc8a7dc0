"""Small jobs on `concurrent_executor` for test_executor.py, module-level so `dg.reconstructable` finds them.

Also a child-process entry point, `run_in_child`, so tests can run a job in a separate run-worker process.
"""

import contextlib
import fcntl
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from mp_pipelines.dagster_ext.executor import concurrent_executor

POOL = "mp_test_pool"


@contextlib.contextmanager
def track_concurrency(counter_file: str) -> Iterator[None]:
    """Count holders of `counter_file` across threads and processes; the file keeps `current max`."""
    if not counter_file:
        yield
        return

    def update(delta: int) -> None:
        with open(counter_file, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            handle.seek(0)
            current, peak = (int(n) for n in (handle.read().split() or ["0", "0"]))
            current += delta
            handle.seek(0)
            handle.truncate()
            handle.write(f"{current} {max(peak, current)}")

    update(+1)
    try:
        yield
    finally:
        update(-1)


def peak_concurrency(counter_file: Path) -> int:
    """Most holders `track_concurrency` saw at once."""
    return int(counter_file.read_text().split()[1])


ITEM_CONFIG = {"seconds": dg.Field(float, default_value=0.5), "counter": dg.Field(str, default_value="")}


def wait_at_barrier(barrier_dir: str, run_id: str, parties: int, timeout: float = 60.0) -> None:
    """Block until `parties` runs have reached `barrier_dir`, so that simultaneous runs really overlap."""
    Path(barrier_dir, run_id).touch()
    deadline = time.monotonic() + timeout
    while len(list(Path(barrier_dir).iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(Path(barrier_dir).iterdir()))} of {parties} runs reached {barrier_dir}")
        time.sleep(0.05)


EMIT_CONFIG = {
    "count": dg.Field(int, default_value=20),
    "barrier": dg.Field(str, default_value="", description="Folder where simultaneous runs wait for each other."),
    "parties": dg.Field(int, default_value=1),
}


@dg.op(out=dg.DynamicOut(int), config_schema=EMIT_CONFIG)
def emit(context: dg.OpExecutionContext) -> Iterator[dg.DynamicOutput[int]]:
    """Fan out `count` items keyed by their index (after the other runs reach the barrier, if one is set)."""
    if context.op_config["barrier"]:
        wait_at_barrier(context.op_config["barrier"], context.run_id, context.op_config["parties"])
    for index in range(context.op_config["count"]):
        yield dg.DynamicOutput(index, mapping_key=str(index))


@dg.op(config_schema=ITEM_CONFIG, tags={"kind": "llm"})
def sleep_item(context: dg.OpExecutionContext, item: int) -> dict[str, Any]:
    """Stand-in for an I/O-bound call: sleep, and report what this step's own context says."""
    with track_concurrency(context.op_config["counter"]):
        print(f"stdout from item {item}")
        time.sleep(context.op_config["seconds"])
    return {"item": item, "mapping_key": context.get_mapping_key(), "step_key": context.get_step_execution_context().step.key}


@dg.op
def collect(results: list[dict[str, Any]]) -> list[int]:
    """Items in mapping order."""
    return [result["item"] for result in results]


@dg.job(executor_def=concurrent_executor)
def fanout_job() -> None:
    collect(emit().map(sleep_item).collect())


@dg.success_hook
def note_success(context: dg.HookContext) -> None:
    """Log the step the hook ran for, so tests can match it against the step's events."""
    context.log.info(f"hook saw {context.step_key}")


@dg.job(executor_def=concurrent_executor, hooks={note_success})
def hooked_fanout_job() -> None:
    collect(emit().map(sleep_item).collect())


@dg.job(executor_def=dg.in_process_executor)
def in_process_fanout_job() -> None:
    collect(emit().map(sleep_item).collect())


@dg.op(config_schema=ITEM_CONFIG, pool=POOL)
def pooled_item(context: dg.OpExecutionContext, item: int) -> int:
    """Holds a slot of the `mp_test_pool` concurrency pool while it sleeps."""
    with track_concurrency(context.op_config["counter"]):
        time.sleep(context.op_config["seconds"])
    return item


@dg.job(executor_def=concurrent_executor)
def pool_job() -> None:
    emit().map(pooled_item)


@dg.op(retry_policy=dg.RetryPolicy(max_retries=1, delay=1.5))
def flaky(context: dg.OpExecutionContext) -> str:
    """Fails its first attempt; the retry policy re-runs it 1.5 s later."""
    if context.retry_number == 0:
        raise RuntimeError("first attempt fails")
    return "recovered"


@dg.op
def tick(previous: int) -> int:
    """One link of a chain that keeps running while `flaky` waits for its retry."""
    time.sleep(0.3)
    return previous + 1


@dg.op
def start_chain() -> int:
    return 0


@dg.job(executor_def=concurrent_executor)
def retry_job() -> None:
    flaky()
    value = start_chain()
    for _ in range(8):
        value = tick(value)


@dg.op(config_schema=ITEM_CONFIG)
def maybe_fail(context: dg.OpExecutionContext, item: int) -> int:
    """Item 3 fails with a recognisable error; the others sleep and succeed."""
    if item == 3:
        raise ValueError("boom from item 3")
    time.sleep(context.op_config["seconds"])
    return item * 10


@dg.op
def slow_sibling() -> str:
    """Independent of the fan-out; still running when item 3 fails."""
    time.sleep(1.0)
    return "done"


@dg.job(executor_def=concurrent_executor)
def failing_job() -> None:
    collect.alias("collect_ints")(emit().map(maybe_fail).collect())
    slow_sibling()


@dg.op(out=dg.Out(str))
def produce_then_fail() -> Iterator[dg.Output[str]]:
    """Hands its output downstream, then keeps working and fails."""
    yield dg.Output("payload")
    time.sleep(1.5)
    raise RuntimeError("producer failed after its output")


@dg.op
def consume(payload: str) -> str:
    return payload.upper()


@dg.job(executor_def=concurrent_executor)
def early_output_job() -> None:
    consume(produce_then_fail())


JOBS = {job.name: job for job in (fanout_job, hooked_fanout_job, in_process_fanout_job, pool_job, retry_job)}


def run_in_child() -> None:
    """`python -c '...run_in_child()' JOB INSTANCE_REF RUN_CONFIG_JSON TAGS_JSON`: one run, as a run worker would."""
    job_name, instance_ref, run_config, tags = sys.argv[1:5]
    with dg.DagsterInstance.from_ref(dg.deserialize_value(instance_ref)) as instance:
        result = dg.execute_job(
            dg.reconstructable(JOBS[job_name]),
            instance=instance,
            run_config=json.loads(run_config),
            tags=json.loads(tags),
        )
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
