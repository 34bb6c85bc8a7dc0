"""The production set-up at work: webserver and dagster-daemon on PostgreSQL with deploy/dagster.yaml.

One deployment serves the module: the run queue keeps at most 2 runs in progress, a due schedule
launches its run, and a file dropped into the inbox starts a run of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from mp_pipelines.spec.loader import SHIPPED_WORKFLOWS_DIR
from mp_pipelines_tests.postgres import temporary_database
from mp_pipelines_tests.services import (
    DagsterServices,
    dagster_services,
    pg_env,
    wait_for,
    write_instance_config,
)
from mp_pipelines_tests.workflow_helpers import write_workflow

MAX_RUNS = 2
IN_PROGRESS = {"STARTING", "STARTED", "CANCELING"}
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
RUNS_QUERY = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter, limit: 200) {
    __typename
    ... on Runs { results { runId jobName status startTime endTime runConfigYaml tags { key value } } }
    ... on PythonError { message }
  }
}
"""
INBOX_SENSOR = "classify_tickets_inbox_sensor"
TICKS_QUERY = """
query($after: Float) {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { sensors { name sensorState {
      ticks(afterTimestamp: $after, limit: 50) { tickId status timestamp runIds runKeys skipReason cursor error { message } }
    } } } }
    ... on PythonError { message }
  }
}
"""


@dataclass
class Deployment:
    services: DagsterServices
    inbox: Path
    started: float


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Webserver + daemon on a fresh PostgreSQL database, with two extra workflows and an inbox."""
    root = tmp_path_factory.mktemp("daemon")
    workflows = root / "workflows"
    workflows.mkdir()
    # One slow-ish call per run (MP_SIMULATED_LATENCY below), so queued runs would overlap if allowed to.
    write_workflow(workflows, {"name": "queue_probe", "inputs": {"n": {"type": "integer", "default": 0}},
                               "tasks": [{"name": "answer", "prompt": "Say hello to number {{ inputs.n }}."}]})
    write_workflow(workflows, {"name": "every_minute", "schedule": {"cron": "* * * * *", "enabled": True,
                                                                   "inputs": {"who": "the scheduler"}},
                               "inputs": {"who": {"type": "string"}},
                               "tasks": [{"name": "greet", "prompt": "Greet {{ inputs.who }}."}]})
    inbox = root / "inbox"
    (inbox / "classify_tickets").mkdir(parents=True)
    home = root / "dagster_home"
    write_instance_config(home, max_concurrent_runs=MAX_RUNS)
    with temporary_database() as dbname:
        env = {**pg_env(dbname), "MP_WORKFLOWS_PATH": str(workflows), "MP_SIMULATED_LATENCY": "1.5",
               "MP_INBOX_DIR": str(inbox), "MP_INBOX_SETTLE_SECONDS": "1", "MP_INBOX_INTERVAL_SECONDS": "5"}
        with dagster_services(home, env) as services:
            yield Deployment(services, inbox, time.time())


def runs(services: DagsterServices, **filter_: object) -> list[dict]:
    data = services.graphql(RUNS_QUERY, {"filter": filter_ or None})["runsOrError"]
    assert data["__typename"] == "Runs", data
    return data["results"]


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}


def sensor_ticks(services: DagsterServices, sensor: str, after: float) -> list[dict]:
    """The evaluated (no longer STARTED) ticks of `sensor` that started after `after` (a time.time()), oldest first."""
    data = services.graphql(TICKS_QUERY, {"after": after})["repositoriesOrError"]
    assert data["__typename"] == "RepositoryConnection", data
    (found,) = [s for node in data["nodes"] for s in node["sensors"] if s["name"] == sensor]
    return sorted((t for t in found["sensorState"]["ticks"] if t["status"] != "STARTED"), key=lambda t: t["timestamp"])


def cursor_state(tick: dict, name: str) -> dict | None:
    """What the inbox sensor's cursor after `tick` says about the file `name` (None: nothing yet)."""
    return json.loads(tick["cursor"])["files"].get(name) if tick["cursor"] else None


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals that share one instant."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _, step in points:  # at equal times an end (-1) sorts before a start (+1)
        current += step
        peak = max(peak, current)
    return peak


def test_the_run_queue_keeps_at_most_two_runs_in_progress(deployment: Deployment) -> None:
    services = deployment.services
    client = services.client()
    config = {"execution": {"config": {"in_process": {}}}}
    run_ids = [client.submit_job_execution("queue_probe", run_config={**config, "ops": {"inputs": {"config": {"n": i}}}},
                                           tags={"test": "queue"}) for i in range(6)]
    peak = 0
    deadline = time.monotonic() + 240
    while True:
        statuses = {run["runId"]: run["status"] for run in runs(services)}  # every run, the schedule's too
        in_progress = [rid for rid, status in statuses.items() if status in IN_PROGRESS]
        peak = max(peak, len(in_progress))
        assert len(in_progress) <= MAX_RUNS, f"{len(in_progress)} runs in progress at once: {statuses}"
        if all(statuses.get(rid) in FINISHED for rid in run_ids):
            break
        assert time.monotonic() < deadline, f"runs not finished after 240 s: {statuses}\n{services.diagnostics()}"
        time.sleep(0.3)
    finished = {run["runId"]: run for run in runs(services)}
    failed = [rid for rid in run_ids if finished[rid]["status"] != "SUCCESS"]
    assert not failed, "\n".join(services.run_errors(rid) for rid in failed) + "\n" + services.diagnostics()
    intervals = [(run["startTime"], run["endTime"]) for run in finished.values() if run["startTime"]]
    assert max_overlap(intervals) <= MAX_RUNS  # also between polls, from the recorded start and end times
    assert peak == MAX_RUNS  # the runs did overlap: the limit, not luck, kept them to two


def test_a_due_schedule_launches_its_run(deployment: Deployment) -> None:
    services = deployment.services
    # the every-minute schedule fires at the first minute boundary after the daemon started
    first_tick = deployment.started - deployment.started % 60 + 60
    timeout = max(first_tick - time.time(), 0) + 60
    scheduled = wait_for(lambda: runs(services, tags=[{"key": "dagster/schedule_name",
                                                       "value": "every_minute_schedule"}]),
                         timeout, "a run of every_minute_schedule", interval=2, diagnostics=services.diagnostics)
    run = scheduled[-1]
    assert run["jobName"] == "every_minute"
    assert "who: the scheduler" in run["runConfigYaml"]
    wait_for(lambda: services.run_status(run["runId"]) in FINISHED, 120, "the scheduled run to finish",
             diagnostics=services.diagnostics)
    assert services.run_status(run["runId"]) == "SUCCESS"


def test_an_inbox_file_starts_a_run_that_materializes_the_assets(deployment: Deployment) -> None:
    services = deployment.services
    tickets = pd.read_csv(SHIPPED_WORKFLOWS_DIR / "data" / "tickets.csv").head(3)
    path = deployment.inbox / "classify_tickets" / "tuesday.csv"
    tickets.to_csv(path, index=False)
    found = wait_for(lambda: runs(services, tags=[{"key": "mp_pipelines/inbox_file", "value": "tuesday.csv"}]),
                     120, "the inbox sensor to start a run for tuesday.csv", interval=1,
                     diagnostics=services.diagnostics)
    (run,) = found
    assert str(path) in run["runConfigYaml"]
    wait_for(lambda: services.run_status(run["runId"]) in FINISHED, 180, "the inbox run to finish",
             diagnostics=services.diagnostics)
    assert services.run_status(run["runId"]) == "SUCCESS", services.diagnostics()
    data = services.graphql("""{ assetNodeOrError(assetKey: {path: ["classify_tickets", "classify"]}) {
        ... on AssetNode { isMaterializable assetMaterializations(limit: 5) { runId } } } }""")
    node = data["assetNodeOrError"]
    assert node["isMaterializable"] and {"runId": run["runId"]} in node["assetMaterializations"]
    # the same content under another name is not processed again: wait for two sensor ticks that started after the
    # copy was written, one of them (the first, unless the copy was younger than MP_INBOX_SETTLE_SECONDS) deciding on it
    (deployment.inbox / "classify_tickets" / "tuesday_again.csv").write_bytes(path.read_bytes())
    written = time.time()

    def two_ticks_deciding_on_the_copy() -> list[dict]:
        ticks = sensor_ticks(services, INBOX_SENSOR, after=written)
        return ticks if len(ticks) >= 2 and any(cursor_state(t, "tuesday_again.csv") for t in ticks) else []

    ticks = wait_for(two_ticks_deciding_on_the_copy, 60,
                     f"two evaluated ticks of {INBOX_SENSOR} after tuesday_again.csv was written, one deciding on it",
                     diagnostics=services.diagnostics)
    assert [t["status"] for t in ticks] == ["SKIPPED"] * len(ticks), ticks
    assert [(t["runIds"], t["runKeys"], t["error"]) for t in ticks] == [([], [], None)] * len(ticks), ticks
    assert all(t["skipReason"].startswith("no new files in ") for t in ticks), ticks
    decisions = [cursor_state(t, "tuesday_again.csv") for t in ticks if cursor_state(t, "tuesday_again.csv")]
    assert decisions[0]["outcome"] == "duplicate", decisions
    assert decisions[0]["sha256"] == tags(run)["mp_pipelines/inbox_sha256"]  # the content of tuesday.csv
    assert decisions[0]["reason"] == "same content as tuesday.csv", decisions
    assert decisions == [decisions[0]] * len(decisions)  # decided once, then left alone
    assert not runs(services, tags=[{"key": "mp_pipelines/inbox_file", "value": "tuesday_again.csv"}])
    again = services.graphql('{ assetNodeOrError(assetKey: {path: ["classify_tickets", "classify"]}) '
                             '{ ... on AssetNode { assetMaterializations(limit: 5) { runId } } } }')
    assert [m["runId"] for m in again["assetNodeOrError"]["assetMaterializations"]] == [run["runId"]]
