"""Hardening: credentials in URLs never leak, remote commands keep an overall deadline, bad settings and input
files are one-sentence errors, and a loop stopped by the budget is reported as stopped."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner
from dagster._serdes import serialize_value  # dagster 1.13.27: the form events and runs are stored in

from mp_pipelines.cli.main import main
from mp_pipelines.cli.running import local_instance
from mp_pipelines.llm.client import LLMClient
from mp_pipelines.llm.redact import redact, split_credentials
from mp_pipelines.llm.types import LLMError, LLMRequest
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.services import free_port
from mp_pipelines_tests.workflow_helpers import materializations, write_workflow

USER, PASSWORD = "alice", "hunter2-Canary-pw"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()  # what HTTP Basic auth sends
FAN_OUT = """
name: cred_leak
inputs:
  names: {type: list, default: [Ada, Grace]}
on_item_failure: skip
min_success_ratio: 0.5
tasks:
  - name: greet
    for_each: inputs.names
    prompt: "Say hello to {{ item }}"
  - name: summary
    prompt: "Summarise: {% for g in greet %}{{ g }} {% endfor %}"
"""


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{PASSWORD}@", 1)


def assert_no_credentials(where: str, text: str) -> None:
    assert PASSWORD not in text, f"the URL's password appears in {where}"
    assert TOKEN not in text, f"the Basic credential appears in {where}"


# --- credentials in URLs ------------------------------------------------------------------------------------------


def test_redact_masks_url_passwords_authorization_values_keys_and_known_secrets() -> None:
    text = (f"Unsupported header Authorization: Basic {TOKEN}; bearer sk-live-0123456789 at "
            f"http://{USER}:{PASSWORD}@gateway:8080/v1, key sk-proj-abcdef123456, also {PASSWORD[::-1]}")
    assert redact(text, [PASSWORD[::-1]]) == ("Unsupported header Authorization: Basic ***; bearer *** at "
                                              "http://***@gateway:8080/v1, key sk-***, also ***")
    prose = "basic validation failed: the bearer of this token limit is http://gateway/v1 (see a@b)"
    assert redact(prose) == prose
    split = split_credentials(f"https://{USER}:hunter%402@[::1]:8443/v1")
    assert (split.public_url, split.username, split.password) == ("https://[::1]:8443/v1", USER, "hunter@2")
    assert "hunter" not in repr(split) and split_credentials("http://host/v1").present is False


def test_url_credentials_are_sent_as_basic_auth_and_kept_out_of_errors_and_logs(
        llm_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the client's retry lines, the openai and httpx debug logs too
    llm_server.faults.add("server_error").add("echo_authorization")
    client = LLMClient(base_url=with_credentials(llm_server.base_url), max_retries=1)
    try:
        with pytest.raises(LLMError) as caught:
            client.complete(LLMRequest(messages=[{"role": "user", "content": "hi"}], model="m", label="a"))
    finally:
        client.close()
    message = str(caught.value)
    assert "was rejected with HTTP 400" in message and "Authorization: Basic ***" in message  # sent as Basic auth
    assert [r.fault for r in llm_server.requests] == ["server_error", "echo_authorization"]
    assert "Retrying LLM call a" in caplog.text  # the retry after the 500 was logged, naming the endpoint
    for where, text in (("the error", message), ("the Python log", caplog.text), ("the client", repr(client)),
                        ("the base URL", client.base_url)):
        assert_no_credentials(where, text)


def test_url_credentials_reach_no_output_event_record_or_file(llm_server: RunningServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the CLI keeps its instance, to read it afterwards
    # one item's call and the summary's call get a 400 that echoes the Authorization header; the other item succeeds
    llm_server.faults.add("echo_authorization").add().add("echo_authorization")
    env = {**os.environ, "OPENAI_BASE_URL": with_credentials(llm_server.base_url), "PYTHONUNBUFFERED": "1"}
    # a process of its own, so that its stdout and stderr are real and the steps' compute logs are captured;
    # --verbose keeps Dagster's console log (errors with their stack traces) in both, so both are checked
    result = subprocess.run([sys.executable, "-m", "mp_pipelines.cli", "run", str(write_workflow(tmp_path, FAN_OUT)),
                             "--json", "--verbose"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    (failed_item,) = summary["tasks"]["greet"]["failed_items"]
    for error in (failed_item["error"], summary["tasks"]["summary"]["error"]):
        assert "HTTP 400" in error and "Authorization: Basic ***" in error
    assert [r.fault for r in llm_server.requests].count("echo_authorization") == 2
    assert_no_credentials("the CLI's output", result.stdout + result.stderr)
    with local_instance() as instance:
        assert_run_keeps_the_credentials(instance, summary["run_id"])
    compute_logs = [p for p in tmp_path.rglob("compute_logs/*") if p.is_file()]
    assert any(b"Authorization: Basic ***" in p.read_bytes() for p in compute_logs)  # the errors reached them
    for file in (p for p in tmp_path.rglob("*") if p.is_file()):  # event and run storage, compute logs, outputs
        data = file.read_bytes()
        assert PASSWORD.encode() not in data and TOKEN.encode() not in data, f"a credential appears in {file}"


def assert_run_keeps_the_credentials(instance: dg.DagsterInstance, run_id: str) -> None:
    """Nothing Dagster stored about the run holds them: events, errors, metadata, run config, tags."""
    logs = instance.all_logs(run_id)
    assert any(entry.dagster_event_type == dg.DagsterEventType.STEP_FAILURE for entry in logs)
    for entry in logs:
        assert_no_credentials(f"event {entry.dagster_event_type}", serialize_value(entry) + str(entry))
    assert_no_credentials("the run (config and tags)", serialize_value(instance.get_run_by_id(run_id)))
    assert_no_credentials("materializations", serialize_value(materializations(instance, run_id)))


# --- remote commands: overall deadline, credentials in --url ---------------------------------------------------------


class _StubHandler(BaseHTTPRequestHandler):
    """Answers every POST as its server's `mode` says, and records the Authorization header it got."""

    server: _StubServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.authorizations.append(self.headers.get("authorization"))
        if self.server.mode == "trickle":
            self._trickle(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            return
        body = json.dumps({"data": {"pipelineRunOrError": {"__typename": "Run", "status": "SUCCESS"}}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes) -> None:
        """One byte every TRICKLE_INTERVAL s: each read gets something, so only an overall deadline ends it.
        Stops by itself after TRICKLE_LIMIT s, or when the client has gone or the test is over."""
        started = time.monotonic()
        for byte in data:
            if time.monotonic() - started > TRICKLE_LIMIT or self.server.stopping.wait(TRICKLE_INTERVAL):
                break
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up and closed the connection
                break
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # keep the test output to what matters
        pass


TRICKLE_INTERVAL = 0.2  # seconds between two bytes
TRICKLE_LIMIT = 30.0  # seconds a trickled answer may last (the old per-read timeout of 30 s never fired)


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.mode = "status"
        self.authorizations: list[str | None] = []
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def stub_webserver() -> Iterator[_StubServer]:
    """A loopback HTTP server standing in for a Dagster webserver: it trickles its answer or answers a run status."""
    server = _StubServer()
    thread = threading.Thread(target=server.serve_forever, name="stub-webserver", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("args", [["status", "some-run"], ["cancel", "some-run"], ["reload"],
                                  ["launch", "research_report", "-i", "topic=x"]])
def test_remote_commands_stop_at_their_overall_deadline(stub_webserver: _StubServer, args: list[str]) -> None:
    stub_webserver.mode = "trickle"
    started = time.monotonic()
    result = CliRunner().invoke(main, [*args, "--url", stub_webserver.url, "--timeout", "1.5"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert (f"the Dagster webserver at {stub_webserver.url} did not answer within the command's deadline of 1.5 s "
            "(raise it with --timeout)") in result.output
    assert "Traceback" not in result.output and stub_webserver.authorizations  # it did reach the server
    assert elapsed < 1.5 + 5, f"took {elapsed:.1f} s"  # not TRICKLE_LIMIT: the trickle never ended it


def test_url_credentials_of_remote_commands_are_sent_as_basic_auth_and_never_printed(
        stub_webserver: _StubServer) -> None:
    url = with_credentials(stub_webserver.url)
    result = CliRunner().invoke(main, ["status", "run-1", "--url", url])
    assert result.exit_code == 0 and result.stdout.strip() == "run run-1: SUCCESS", result.output
    assert stub_webserver.authorizations == [f"Basic {TOKEN}"]
    closed = f"http://127.0.0.1:{free_port()}"
    for args, message in (
            (["status", "x", "--url", with_credentials(closed)], f"cannot reach the Dagster webserver at {closed}:"),
            (["reload", "--url", with_credentials(closed) + "/prefix"], f"at {closed}/prefix: connection refused"),
            (["status", "x", "--url", f"ftp://{USER}:{PASSWORD}@host"], "--url 'ftp://***@host' is not an http(s) URL"),
            (["status", "x", "--url", f"{USER}:{PASSWORD}@[::1"], "--url 'http://***@[::1' has an invalid port or host")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert_no_credentials("the CLI's output", result.output)


# --- settings, input files and loops stopped by the budget ---------------------------------------------------------


@pytest.mark.parametrize("variable, value, allowed", [
    ("MP_SIMULATED_LATENCY", "abc", "a number of seconds, 0 or more"),
    ("MP_SIMULATED_LATENCY", "-1", "a number of seconds, 0 or more"),
    ("MP_SIMULATED_FAILURE_RATE", "2", "a number from 0 to 1"),
    ("MP_MAX_IN_FLIGHT", "0", "a whole number, 1 or more"),
    ("MP_MAX_IN_FLIGHT", "1.5", "a whole number, 1 or more"),
    ("MP_REQUESTS_PER_MINUTE", "fast", "a number greater than 0"),
    ("MP_TOKENS_PER_MINUTE", "0", "a number greater than 0"),
    ("MP_LLM_PROVIDER", "claude", "one of auto, openai, simulated"),
])
def test_a_bad_llm_setting_names_the_variable_and_what_is_allowed(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                                  value: str, allowed: str) -> None:
    from mp_pipelines.llm.resource import SettingsError, build_llm_resource

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        build_llm_resource()
    assert str(caught.value) == f"{variable}={value!r} is not valid: it must be {allowed}."


def test_a_deeply_nested_input_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"topic": ' + "[" * 100_000 + "]" * 100_000 + "}")
    nested = tmp_path / "nested.json"
    nested.write_text('{"topic": ' + "[" * 64 + "]" * 64 + "}")  # JSON reads it; what comes after might not
    for path in (deep, nested):
        for command in (["run", "research_report"], ["launch", "research_report", "--url", "http://127.0.0.1:9"]):
            result = CliRunner().invoke(main, [*command, "--input-file", str(path)])
            assert result.exit_code == 2, result.output
            assert f"cannot read {path}: lists and objects are nested more than 64 levels deep" in result.output
            assert "--input-file" in result.output
    # a workflow only the webserver knows: each --input value is read as YAML, with the same limit
    result = CliRunner().invoke(main, ["launch", "only_on_the_server", "--url", "http://127.0.0.1:9",
                                       "-i", "x=" + "[" * 100_000 + "]" * 100_000])
    assert result.exit_code == 2 and "x: mappings and lists are nested more than 64 levels deep" in result.output


LOOP = """
name: stopped_loop
budget: {max_calls: MAX_CALLS}
tasks:
  - name: plan
    prompt: "Plan something."
  - name: refine
    loop: {max_iterations: 3}
    tasks:
      - name: critique
        prompt: "Review {{ loop.previous.revise if loop.previous else plan }}"
      - name: revise
        prompt: "Fix {{ critique }}"
  - name: report
    prompt: "{{ refine.revise }}"
"""


@pytest.mark.parametrize("max_calls, stopped, finished", [(3, "critique", "revise"), (4, "revise", "critique")])
def test_a_loop_stopped_by_the_budget_is_reported_failed_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_calls: int, stopped: str, finished: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_workflow(tmp_path, LOOP.replace("MAX_CALLS", str(max_calls)))
    result = CliRunner().invoke(main, ["run", str(path), "--json"])
    assert result.exit_code == 1, result.output
    tasks = json.loads(result.stdout)["tasks"]
    reason = f"max_calls of {max_calls} reached"
    assert tasks["refine"]["status"] == "failed" and reason in tasks["refine"]["error"]
    assert tasks[stopped]["status"] == "failed" and reason in tasks[stopped]["error"]
    # the body task that did answer (in the last iteration that ran) reports that answer
    assert tasks[finished] == {"status": "success", "error": None, "output": tasks[finished]["output"],
                               "models": {"gpt-4o-mini": tasks[finished]["models"]["gpt-4o-mini"]}}
    assert tasks[finished]["output"].startswith("[simulated] Response to: ")
    assert tasks["report"]["status"] == "not_run" and tasks["plan"]["status"] == "success"
    assert "could not be loaded" not in result.stdout
