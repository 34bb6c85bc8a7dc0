"""Per-run state has an owner: a process that runs many workflows keeps nothing of the runs that ended."""

from __future__ import annotations

import gc
from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines.calls.limits import PROCESS_LIMITERS
from mp_pipelines.calls.run import RunCalls
from mp_pipelines_tests.workflow_helpers import run_file, write_workflow

RUNS = 100


def test_a_hundred_runs_in_one_process_leave_no_per_run_state(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run's limiters, fan-out semaphores, budget account and identical calls are dropped when its
    resources are torn down; only the process's own limiter per endpoint and model stays."""
    monkeypatch.setenv("MP_CACHE_URL", f"sqlite:///{tmp_path / 'cache.sqlite'}")  # identical-call sharing needs a store
    path = write_workflow(tmp_path, """
        name: many_runs
        inputs: {items: {type: list, default: [a, b, a, c]}, n: {type: integer, default: 0}}
        breadth: 2
        limits: {max_in_flight: 2}
        budget: {max_calls: 1000}
        tasks:
          - name: each
            for_each: inputs.items
            shard_size: 4
            prompt: "run {{ inputs.n }}: say {{ item }}"
    """)
    process_limiters = len(PROCESS_LIMITERS)  # earlier tests of this process may have called other endpoints
    closed: list[int] = []
    close = RunCalls.close

    def counting_close(self: RunCalls) -> None:
        closed.append(self.entries)
        close(self)

    monkeypatch.setattr(RunCalls, "close", counting_close)
    with dg.DagsterInstance.ephemeral() as instance:
        for n in range(RUNS):
            outcome = run_file(path, {"n": n}, instance)
            assert outcome.success, outcome.as_text()
    gc.collect()
    # each run held a semaphore, a run limiter and an account until its resources were torn down
    assert sum(entries >= 3 for entries in closed) == RUNS
    alive = [obj for obj in gc.get_objects() if isinstance(obj, RunCalls)]
    assert sum(run.entries for run in alive) == 0, alive
    assert len(PROCESS_LIMITERS) <= process_limiters + 1  # at most one more: the simulated endpoint's model


def test_the_llm_resource_is_what_the_call_path_calls_a_model() -> None:
    """The call path types its model as the ChatModel Protocol; the Dagster resource must satisfy it."""
    from mp_pipelines.llm.resource import LLMResource
    from mp_pipelines.llm.types import ChatModel

    resource = LLMResource()
    assert isinstance(resource, ChatModel)
    assert resource.endpoint_key().startswith("simulated:") and resource.limit_settings().unlimited
