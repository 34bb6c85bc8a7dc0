"""Batch mode against a loopback OpenAI-compatible server with the Batch API, through the real openai client.

The server is the simulated model (`serve.build_app`): files and batches with shuffled output order; per-line
errors and expiry are scripted with `batch_faults.BatchFaults`. Every run goes through Dagster on a local
instance, whose database also keeps the response store and the batch checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import openai
import pytest

from mp_pipelines.calls.store import CACHE_FILE
from mp_pipelines.cli.running import RunOutcome, resume_run, run_workflow
from mp_pipelines.llm.simulated import SimulatedModel
from mp_pipelines.spec.loader import WorkflowValidationError, load_workflow_file, parse_workflow
from mp_pipelines_tests.batch_faults import BatchFaults, NoBatchAPI
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import materializations, write_workflow

KEY = "sk-test-batch"
FAN = """
name: {name}
inputs:
  words: {{type: list, default: {words}}}
defaults: {{model: gpt-4o-mini, temperature: 0}}
breadth: 16
max_items: 100000
cache: off
{extra}
tasks:
  - name: echo
    for_each: inputs.words
    prompt: "Echo {{{{ item }}}}"
{task_extra}
"""
JSON_TASK = """    output: json
    output_schema: {type: object, properties: {word: {type: string}}, required: [word]}
    retries: {max_retries: 2, delay: 0}"""


def fan(name: str, items: int, *, extra: str = "", task_extra: str = "") -> str:
    words = json.dumps([f"w{i:03d}" for i in range(items)])
    return FAN.format(name=name, words=words, extra=extra, task_extra=task_extra)


@pytest.fixture
def server(llm_server_factory: Any, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """A fresh loopback server (its own batches) as the run's OpenAI endpoint; batches polled every second."""
    running = llm_server_factory(model=SimulatedModel())
    monkeypatch.setenv("OPENAI_BASE_URL", running.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MP_BATCH_POLL_SECONDS", "1")
    return running


def run(path: Path, instance: dg.DagsterInstance, mode: str | None = "batch") -> RunOutcome:
    spec = load_workflow_file(path)
    return run_workflow(spec, {}, source=str(path.resolve()), instance=instance, mode=mode)


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY)


def batch_lines(server: RunningServer, batch_id: str, which: str = "input_file_id") -> list[dict[str, Any]]:
    """The lines of one of a batch's files, read through the Batch API."""
    api = client(server)
    file_id = getattr(api.batches.retrieve(batch_id), which)
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines() if line.strip()]


def test_batch_fan_out_matches_the_online_answers_item_for_item(server: RunningServer, instance: dg.DagsterInstance,
                                                                tmp_path: Path) -> None:
    path = write_workflow(tmp_path, fan("same", 200))
    online = run(path, instance, mode="online")
    assert online.success, online.as_text()
    assert online.provider == "openai", online.as_text()
    assert len(server.requests) == 200 and not server.model.batches.created

    batch = run(path, instance, mode="batch")
    assert batch.success, batch.as_text()
    assert len(server.requests) == 200, "batch mode makes no chat call"
    assert batch.tasks["echo"]["output"] == online.tasks["echo"]["output"]
    (batch_id,) = server.model.batches.created
    api_batch = client(server).batches.retrieve(batch_id)
    assert api_batch.metadata == {"workflow": "same", "run_id": batch.run_id, "task": "echo"}
    assert api_batch.completion_window == "24h" and api_batch.request_counts.total == 200
    inputs = batch_lines(server, batch_id)
    assert [line["custom_id"] for line in inputs] == [f"echo[{i}]" for i in range(200)]
    assert inputs[0]["url"] == "/v1/chat/completions" and inputs[0]["body"]["messages"][-1]["content"] == "Echo w000"
    output_order = [line["custom_id"] for line in batch_lines(server, batch_id, "output_file_id")]
    assert sorted(output_order) == sorted(f"echo[{i}]" for i in range(200))
    assert output_order != [f"echo[{i}]" for i in range(200)], "the server shuffles the output"

    assert online.usage.batch_requests == 0 and batch.usage.batch_requests == 200
    assert batch.usage.calls == 200
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (online.usage.prompt_tokens,
                                                                          online.usage.completion_tokens)
    assert batch.usage.cost_usd == pytest.approx(online.usage.cost_usd / 2, rel=1e-6)
    assert batch.usage.batch_saving_usd == pytest.approx(online.usage.cost_usd / 2, rel=1e-6)
    (event,) = [e for e in materializations(instance, batch.run_id) if e.asset_key.path[-1] == "echo"]
    assert event.metadata["batch_requests"].value == 200
    assert event.metadata["batch_saving_usd"].value == pytest.approx(batch.usage.batch_saving_usd, rel=1e-3)


def test_cached_answers_are_never_submitted(server: RunningServer, instance: dg.DagsterInstance,
                                            tmp_path: Path) -> None:
    first = write_workflow(tmp_path, fan("cached", 6).replace("cache: off", "cache: read_write"))
    assert run(first, instance, mode="online").success
    second = write_workflow(tmp_path, fan("cached", 10).replace("cache: off", "cache: read_write"))
    outcome = run(second, instance, mode="batch")
    assert outcome.success, outcome.as_text()
    (batch_id,) = server.model.batches.created
    assert [line["custom_id"] for line in batch_lines(server, batch_id)] == [f"echo[{i}]" for i in range(6, 10)]
    assert outcome.usage.cache_hits == 6 and outcome.usage.batch_requests == 4


def test_a_line_error_is_retried_and_invalid_json_is_repaired_in_a_follow_up_batch(
        server: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    server.model.batches.faults = BatchFaults(server.model).fail_line("echo[1]", 500).answer_line("echo[2]", "nope")
    outcome = run(write_workflow(tmp_path, fan("repaired", 5, task_extra=JSON_TASK)), instance)
    assert outcome.success, outcome.as_text()
    assert all(isinstance(o, dict) and isinstance(o["word"], str) for o in outcome.tasks["echo"]["output"])
    assert len(outcome.tasks["echo"]["output"]) == 5
    first, follow_up = server.model.batches.created
    assert len(batch_lines(server, first)) == 5
    again = {line["custom_id"]: line["body"]["messages"] for line in batch_lines(server, follow_up)}
    assert sorted(again) == ["echo[1]", "echo[2]"], "the failed line again, and the repair"
    assert len(again["echo[1]"]) == 1
    assert again["echo[2]"][-2] == {"role": "assistant", "content": "nope"}
    assert again["echo[2]"][-1]["content"].startswith("Your answer cannot be used: it is not valid JSON")
    assert not server.requests
    assert outcome.usage.batch_requests == outcome.usage.calls == 6, "every answered line, the unusable one too"


def test_batch_repair_online_sends_the_repair_as_a_chat_call(server: RunningServer, instance: dg.DagsterInstance,
                                                             tmp_path: Path) -> None:
    server.model.batches.faults = BatchFaults(server.model).answer_line("echo[3]", "[1, 2")
    text = fan("repair_online", 4, extra="batch_repair: online", task_extra=JSON_TASK)
    outcome = run(write_workflow(tmp_path, text), instance)
    assert outcome.success, outcome.as_text()
    assert len(server.model.batches.created) == 1
    (repair,) = server.requests
    assert repair.body["messages"][-2] == {"role": "assistant", "content": "[1, 2"}
    assert repair.body["messages"][-1]["content"].startswith("Your answer cannot be used")
    assert outcome.usage.batch_requests == 4 and outcome.usage.calls == 5


def test_requests_over_the_line_limit_are_split_across_files(server: RunningServer, instance: dg.DagsterInstance,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_BATCH_MAX_LINES", "4")
    path = write_workflow(tmp_path, fan("split", 10))
    online = run(path, instance, mode="online")
    outcome = run(path, instance)
    assert outcome.success, outcome.as_text()
    assert outcome.tasks["echo"]["output"] == online.tasks["echo"]["output"]
    files = [[line["custom_id"] for line in batch_lines(server, b)] for b in server.model.batches.created]
    assert files == [[f"echo[{i}]" for i in range(0, 4)], [f"echo[{i}]" for i in range(4, 8)],
                     ["echo[8]", "echo[9]"]]


def test_an_expired_batch_keeps_its_answers_and_resubmits_the_rest_once(
        server: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    server.model.batches.faults = BatchFaults(server.model).expire(1, keep=2)
    path = write_workflow(tmp_path, fan("expiring", 6))
    outcome = run(path, instance)
    assert outcome.success, outcome.as_text()
    first, again = server.model.batches.created
    assert [line["custom_id"] for line in batch_lines(server, again)] == [f"echo[{i}]" for i in range(2, 6)]
    assert client(server).batches.retrieve(first).status == "expired"
    assert len(outcome.tasks["echo"]["output"]) == 6 and outcome.usage.batch_requests == 6


def test_batch_on_expiry_fail_fails_the_requests_not_run(server: RunningServer, instance: dg.DagsterInstance,
                                                         tmp_path: Path) -> None:
    server.model.batches.faults = BatchFaults(server.model).expire(1, keep=2)
    text = fan("expiry_fails", 6, extra="batch_on_expiry: fail\non_item_failure: skip\nmin_success_ratio: 0")
    outcome = run(write_workflow(tmp_path, text), instance)
    assert outcome.success, outcome.as_text()
    assert len(server.model.batches.created) == 1
    failed = outcome.tasks["echo"]["failed_items"]
    assert [f["index"] for f in failed] == [2, 3, 4, 5]
    assert all("expired before this request ran (batch_on_expiry: fail)" in f["error"] for f in failed)
    assert len(outcome.tasks["echo"]["output"]) == 2


def test_a_batch_past_the_budget_is_not_submitted(server: RunningServer, instance: dg.DagsterInstance,
                                                  tmp_path: Path) -> None:
    text = fan("over_budget", 20, extra="budget: {max_cost_usd: 0.00001}").replace(
        "temperature: 0}", "temperature: 0, max_tokens: 100}")
    outcome = run(write_workflow(tmp_path, text), instance)
    assert not outcome.success
    error = outcome.tasks["echo"]["error"]
    assert "max_cost_usd $0.00001" in error and "was not submitted" in error and "20 request(s)" in error
    assert not server.model.batches.created and not server.requests
    assert outcome.usage.calls == 0


def test_a_cost_budget_in_batch_mode_needs_max_tokens(server: RunningServer, instance: dg.DagsterInstance,
                                                      tmp_path: Path) -> None:
    with pytest.raises(WorkflowValidationError, match="task 'echo' runs in batch mode under a cost budget"):
        parse_workflow({"name": "w", "mode": "batch", "budget": {"max_cost_usd": 1},
                        "tasks": [{"name": "echo", "prompt": "p"}]})
    # The same workflow online is valid; run with --mode batch it fails before any call, saying why.
    path = write_workflow(tmp_path, fan("needs_bound", 3, extra="budget: {max_cost_usd: 1}"))
    outcome = run(path, instance, mode="batch")
    assert not outcome.success
    assert "needs max_tokens" in outcome.tasks["echo"]["error"]
    assert not server.model.batches.created


def test_a_bad_batch_setting_fails_the_step_as_a_setting_before_any_batch(
        server: RunningServer, instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started without the CLI's check of the MP_* settings (the Python API, the UI, a sensor): a bad
    MP_BATCH_MAX_LINES fails the step before any batch is sent, named as an environment setting, not retried."""
    monkeypatch.setenv("MP_BATCH_MAX_LINES", "lots")
    outcome = run(write_workflow(tmp_path, fan("bad_lines", 3)), instance)
    assert not outcome.success
    error = outcome.tasks["echo"]["error"]
    assert "environment setting" in error and "MP_BATCH_MAX_LINES='lots'" in error, error
    assert not server.model.batches.created and not server.requests


def test_an_endpoint_without_the_batch_api_fails_clearly_or_falls_back_online(
        server: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    server.model.batches = NoBatchAPI()
    outcome = run(write_workflow(tmp_path, fan("no_batches", 5)), instance)
    assert not outcome.success
    error = outcome.tasks["echo"]["error"]
    assert f"the endpoint {server.base_url} has no Batch API (HTTP 404" in error and "batch_fallback: online" in error
    assert not server.requests

    fallback = run(write_workflow(tmp_path, fan("falls_back", 5, extra="batch_fallback: online")), instance)
    assert fallback.success, fallback.as_text()
    assert len(server.requests) == 5 and fallback.usage.batch_requests == 0


def _start_cli_run(path: Path, server: RunningServer, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": KEY, "MP_BATCH_POLL_SECONDS": "1"}
    env.pop("DAGSTER_HOME", None)
    return subprocess.Popen([sys.executable, "-m", "mp_pipelines.cli", "run", str(path), "--mode", "batch", "--json"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for_checkpoint(child: subprocess.Popen, home: Path, server: RunningServer) -> str:
    """The id of the batch the child run submitted, once its checkpoint is in the instance's database."""
    deadline = time.monotonic() + 120
    while True:
        assert child.poll() is None, f"the run ended early: {child.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no batch was checkpointed within 120 s"
        if server.model.batches.created and (home / CACHE_FILE).exists():
            with sqlite3.connect(home / CACHE_FILE) as conn:
                try:
                    rows = conn.execute("SELECT batch_id FROM mp_llm_batches").fetchall()
                except sqlite3.OperationalError:
                    rows = []
            if rows:
                assert [r[0] for r in rows] == server.model.batches.created
                return rows[0][0]
        time.sleep(0.1)


def test_a_run_killed_while_waiting_resumes_on_the_same_batch(server: RunningServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server.model.batches.completion_delay = 3600.0
    path = write_workflow(tmp_path, fan("killed_waiting", 30))
    child = _start_cli_run(path, server, tmp_path)
    home = tmp_path / ".mp_pipelines" / "dagster_home"
    batch_id = _wait_for_checkpoint(child, home, server)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert client(server).batches.retrieve(batch_id).status == "validating", "a killed run cancels nothing"

    server.model.batches.completion_delay = 0.0  # the batch finishes while nobody waits for it
    monkeypatch.chdir(tmp_path)
    with dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}}) as instance:
        (killed,) = instance.get_runs()
        outcome = resume_run(killed.run_id, instance=instance, force=True)
        assert outcome.success, outcome.as_text()
        logs = [e.user_message for e in instance.all_logs(outcome.run_id)]
    assert server.model.batches.created == [batch_id], "one submission: the resumed run followed the same batch"
    assert any(f"following batch {batch_id} (30 request(s))" in m for m in logs)
    assert len(outcome.tasks["echo"]["output"]) == 30 and not server.requests
    assert outcome.usage.batch_requests == 30


def test_terminating_a_run_cancels_its_batches(server: RunningServer, tmp_path: Path) -> None:
    server.model.batches.completion_delay = 3600.0
    child = _start_cli_run(write_workflow(tmp_path, fan("terminated", 8)), server, tmp_path)
    home = tmp_path / ".mp_pipelines" / "dagster_home"
    batch_id = _wait_for_checkpoint(child, home, server)
    with dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}}) as instance:
        (run_record,) = instance.get_runs()
        instance.report_run_canceling(run_record)
        os.kill(child.pid, signal.SIGINT)  # how Dagster's run launchers deliver termination to a run worker
        child.wait(timeout=60)
        assert server.model.batches.cancelled == [batch_id], child.stderr.read().decode()[-3000:]
        assert client(server).batches.retrieve(batch_id).status in ("cancelling", "cancelled")
        with sqlite3.connect(home / CACHE_FILE) as conn:
            (status,) = conn.execute("SELECT status FROM mp_llm_batches").fetchone()
        assert status == "cancelled", "a later attempt does not follow a cancelled batch"


def test_the_simulated_model_runs_batch_mode_offline(instance: dg.DagsterInstance, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint configured: the in-process simulated model serves the Batch API behind the openai client."""
    monkeypatch.setenv("MP_BATCH_POLL_SECONDS", "1")
    path = write_workflow(tmp_path, fan("offline", 12, task_extra=JSON_TASK))
    online = run(path, instance, mode="online")
    batch = run(path, instance)
    assert batch.success, batch.as_text()
    assert batch.provider == "simulated"
    assert batch.tasks["echo"]["output"] == online.tasks["echo"]["output"]
    assert batch.usage.batch_requests == 12 and online.usage.batch_requests == 0


def test_batch_prices_come_from_the_price_file_or_are_half_the_list_price(tmp_path: Path) -> None:
    from mp_pipelines.calls.pricing import PriceFileError, load_prices

    prices = tmp_path / "prices.yaml"
    prices.write_text("gw-model: {input: 1.0, output: 4.0, batch_input: 0.8, batch_output: 3.0}\n"
                      "plain: {input: 2.0, output: 8.0}\n")
    table = load_prices(prices)
    assert table.batch_cost("gw-model", 1_000_000, 1_000_000) == pytest.approx(3.8)
    assert table.batch_cost("plain", 1_000_000, 1_000_000) == pytest.approx(5.0)
    assert table.batch_cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.075)
    prices.write_text("half: {input: 1.0, output: 4.0, batch_input: 0.5}\n")
    with pytest.raises(PriceFileError, match="model 'half' needs .* optionally with both batch_input and batch_output"):
        load_prices(prices)


def test_schedules_and_the_inbox_set_the_mode_of_their_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mp_pipelines.factory.schedules import schedule_run_config
    from mp_pipelines.sensors.inbox import Batch, _run_request

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    spec = parse_workflow({"name": "nightly", "schedule": {"cron": "0 6 * * *", "mode": "batch"},
                           "inputs": {"rows": {"type": "table", "default": "x.csv"}},
                           "tasks": [{"name": "t", "prompt": "{{ inputs.rows }}"}]})
    llm = schedule_run_config(spec)["resources"]["llm"]["config"]
    assert llm == {"mode": "batch", "base_url": {"env": "OPENAI_BASE_URL"}, "api_key": {"env": "OPENAI_API_KEY"}}
    assert KEY not in json.dumps(llm), "the key is named, never copied into run config"

    monkeypatch.setenv("MP_INBOX_MODE", "batch")
    request = _run_request(spec, Batch("a.csv", tmp_path / "a.csv", "0" * 64))
    assert request.run_config["resources"]["llm"]["config"]["mode"] == "batch"
    monkeypatch.setenv("MP_INBOX_MODE", "later")
    with pytest.raises(ValueError, match="MP_INBOX_MODE='later' is not valid: it must be batch or online"):
        _run_request(spec, Batch("a.csv", tmp_path / "a.csv", "0" * 64))


def test_waiting_shows_the_batch_status_and_request_counts(server: RunningServer, instance: dg.DagsterInstance,
                                                           tmp_path: Path) -> None:
    server.model.batches.completion_delay = 3.0
    outcome = run(write_workflow(tmp_path, fan("progress", 4)), instance)
    assert outcome.success, outcome.as_text()
    (batch_id,) = server.model.batches.created
    progress = [e.user_message for e in instance.all_logs(outcome.run_id)
                if f"batch {batch_id} " in e.user_message and "request(s) done" in e.user_message]
    statuses = [line.split(f"batch {batch_id} ")[1].split(",")[0] for line in progress]
    assert statuses[0] == "validating" and "in_progress" in statuses and statuses[-1] == "completed"
    assert progress[-1].endswith("4 of 4 request(s) done, 0 failed")
