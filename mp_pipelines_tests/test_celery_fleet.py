"""A fan-out on a real Celery fleet: real Redis broker/backend, two `mp-pipelines worker` processes, the openai
client over HTTP to a loopback server that counts every request per item."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mp_pipelines.cli.running import RunOutcome, run_workflow
from mp_pipelines.llm.simulated import SimulatedModel
from mp_pipelines.spec.loader import load_workflow_file
from mp_pipelines_tests.celery_fleet import (
    Fleet,
    answered_at,
    celery_fleet,
    drain_and_kill_mid_shard,
    requests_per_item,
    step_workers,
)
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import write_workflow

pytestmark = pytest.mark.timeout(300)

ITEMS = 200
BREADTH = 8


def fan_out(name: str, items: int = ITEMS, shard: int = 25) -> str:
    return f"""
name: {name}
breadth: {BREADTH}
inputs:
  words: {{type: list, default: {[f"w{i:04d}" for i in range(items)]}}}
tasks:
  - name: echo
    for_each: inputs.words
    shard_size: {shard}
    prompt: "Echo {{{{ item }}}}"
"""


def fleet_env(tmp_path: Path, server: RunningServer) -> dict[str, str]:
    storage = tmp_path / "step_storage"
    storage.mkdir(exist_ok=True)
    return {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test-not-a-real-key",
            "MP_STEP_STORAGE_DIR": str(storage), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}


def run_on_fleet(path: Path, instance: dg.DagsterInstance, fleet: Fleet, env: dict[str, str],
                 monkeypatch: pytest.MonkeyPatch) -> RunOutcome:
    for name, value in {**env, "MP_CELERY_BROKER": fleet.broker}.items():
        monkeypatch.setenv(name, value)
    return run_workflow(load_workflow_file(path), {}, source=str(path.resolve()), executor="celery", instance=instance)


def in_process_results(path: Path, tmp_path: Path, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in fleet_env(tmp_path, server).items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "in_process_home"
    home.mkdir()
    with dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}}) as instance:
        outcome = run_workflow(load_workflow_file(path), {}, source=str(path.resolve()), executor="in_process",
                               instance=instance)
    assert outcome.success, outcome.as_text()
    server.reset()
    return outcome.tasks["echo"]["output"]


def test_fan_out_runs_on_both_workers_once_per_item_in_order_within_breadth(
        tmp_path: Path, instance: dg.DagsterInstance, llm_server_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = llm_server_factory(model=SimulatedModel(latency=0.05))
    path = write_workflow(tmp_path, fan_out("celery_fan_out"))
    expected = in_process_results(path, tmp_path, server, monkeypatch)
    env = fleet_env(tmp_path, server)
    with celery_fleet(env, tmp_path) as fleet:
        outcome = run_on_fleet(path, instance, fleet, env, monkeypatch)
        logs = "\n".join(f"--- {w.name}\n{w.tail()}" for w in fleet.workers)
    assert outcome.success, outcome.as_text() + logs
    assert outcome.tasks["echo"]["output"] == expected  # input order, same answers as the in-process run
    counts = requests_per_item(server)
    assert len(counts) == ITEMS and set(counts.values()) == {1}, counts.most_common(3)
    workers = step_workers(instance, outcome.run_id)
    shards = {step: hosts for step, hosts in workers.items() if ".echo[" in step}  # <workflow>__echo.echo[k]
    assert len(shards) == ITEMS // 25
    ran = {host.split("@")[0] for hosts in shards.values() for host in hosts}
    assert ran == {"w1", "w2"}, shards  # each worker ran at least one shard
    assert 1 < server.in_flight.peak <= BREADTH  # both workers' shards together, never past breadth


def test_worker_killed_mid_run_its_shard_finishes_on_the_other_without_paying_twice(
        tmp_path: Path, instance: dg.DagsterInstance, llm_server_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the pool process running a shard on one worker (after it stopped taking new steps, as a machine
    being drained would): the step goes back on the queue, the other worker runs it, and the items answered
    before the kill come from the run's checkpoint instead of the model."""
    server = llm_server_factory(model=SimulatedModel(latency=0.5))
    path = write_workflow(tmp_path, fan_out("celery_worker_lost"))
    env = fleet_env(tmp_path, server)
    with celery_fleet(env, tmp_path) as fleet:
        outcome: list[RunOutcome] = []
        runner = threading.Thread(target=lambda: outcome.append(run_on_fleet(path, instance, fleet, env, monkeypatch)))
        runner.start()
        victim, step, before, killed_at = drain_and_kill_mid_shard(instance, fleet, server)
        runner.join(timeout=240)
        logs = "\n".join(f"--- {w.name}\n{w.tail()}" for w in fleet.workers)
    assert outcome and outcome[0].success, (outcome[0].as_text() if outcome else "run did not finish") + logs
    result = outcome[0]
    output = result.tasks["echo"]["output"]
    assert len(output) == ITEMS and all(f"Echo w{i:04d} " in text for i, text in enumerate(output))  # input order
    hosts = step_workers(instance, result.run_id)[step]
    assert len(hosts) == 2 and hosts[0].startswith(f"{victim.name}@") and not hosts[1].startswith(f"{victim.name}@"), hosts
    counts = requests_per_item(server)
    assert len(counts) == ITEMS
    twice = sorted(item for item, n in counts.items() if n > 1)
    assert all(counts[item] == 2 for item in twice)
    # only calls in flight at the kill (at most breadth) or answered in the store's last write batch
    # (FLUSH_SECONDS, 50 ms) are asked again; every item answered well before the kill is not
    settled = [item for item, n in before.items() if n == 1 and answered_at(server, item) < killed_at - 1.0]
    assert settled and not set(settled) & set(twice), twice
    # in flight at the kill: at most breadth; answered in its last second: not yet settled in the store for sure
    recent = [item for item, n in before.items() if n == 1 and answered_at(server, item) >= killed_at - 1.0]
    assert len(twice) <= BREADTH + len(recent), (twice, recent)


def test_celery_without_a_broker_is_bad_usage_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mp_pipelines.cli.main import main

    monkeypatch.chdir(tmp_path)
    path = write_workflow(tmp_path, fan_out("no_broker", items=3))
    runner = CliRunner()
    for args in (["run", str(path), "--executor", "celery"], ["worker"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "needs a broker: set MP_CELERY_BROKER" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("MP_FLEET_LIMITS", "sometimes")
    result = runner.invoke(main, ["run", str(path), "--executor", "celery"])
    assert result.exit_code == 2 and "MP_FLEET_LIMITS='sometimes' is not valid: it must be one of auto, on, off" in result.output


def test_the_deployment_guide_names_what_the_fleet_reads() -> None:
    """docs/deployment.md's Celery fleet commands are the ones the tests above run, with the settings the code reads."""
    from mp_pipelines.calls.fleet_stores import LIMITS_REDIS_URL_ENV
    from mp_pipelines.dagster_ext.celery import CELERY_BACKEND_ENV, CELERY_BROKER_ENV, QUEUE
    from mp_pipelines.definitions import STEP_STORAGE_DIR_ENV
    from mp_pipelines.factory.ops import FLEET_LIMITS_ENV, FLEET_MODES

    guide = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    section = guide.split("## Celery fleet", 1)[1].split("\n## Kubernetes", 1)[0]
    commands = section.split("```bash", 1)[1].split("```", 1)[0]
    for name in (CELERY_BROKER_ENV, CELERY_BACKEND_ENV, STEP_STORAGE_DIR_ENV):
        assert f"export {name}=" in commands
    assert "mp-pipelines worker -n" in commands and "--executor celery" in commands
    assert f"-Q {QUEUE}" in section and LIMITS_REDIS_URL_ENV in section and FLEET_LIMITS_ENV in section
    assert all(f"`{mode}`" in section for mode in FLEET_MODES)


def test_a_budget_without_a_shared_account_is_refused_on_celery_as_on_multiprocess() -> None:
    from mp_pipelines.factory.ops import budget_refusal
    from mp_pipelines.spec.models import BudgetSpec

    budget = BudgetSpec(max_calls=5)
    celery = {"execution": {"config": {"celery": {}}}}
    reason = budget_refusal(budget, celery, "MP_CACHE_URL is 'none'", ["gpt-4o-mini"])
    assert reason is not None and "step processes of the celery executor" in reason and "MP_CACHE_URL" in reason
    assert budget_refusal(budget, celery, None, ["gpt-4o-mini"]) is None  # one account in the store's database
