"""`dagster-webserver` and `dagster-daemon` as real subprocesses on loopback, for end-to-end tests.

`dagster_services(home, env)` writes nothing itself: give it a DAGSTER_HOME holding a dagster.yaml
(`write_instance_config` copies deploy/dagster.yaml with test overrides). It starts the processes
with their own environment (the daemon's code server passes it on to the runs it launches), waits
until the webserver answers GraphQL with the code location loaded and every daemon reports healthy,
and stops the whole process groups afterwards. Every wait is bounded; a timeout's error carries the
tail of both logs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = REPO / "deploy" / "dagster.yaml"
LOCATION = "mp_pipelines.definitions:defs"  # workspace.yaml: module plus attribute
# Settings of the outer shell that would change what the services load or which model they call.
_AMBIENT = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MP_LLM_PROVIDER", "MP_WORKFLOWS_PATH", "MP_SIMULATED_LATENCY",
            "MP_SIMULATED_FAILURE_RATE", "MP_INBOX_DIR", "MP_FAILURE_LOG", "DAGSTER_HOME", "MP_INPUT_ROOTS",
            "MP_LOCAL_RUN_DIR")
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_env(dbname: str) -> dict[str, str]:
    """The DAGSTER_PG_* variables deploy/dagster.yaml reads, for database `dbname`."""
    from mp_pipelines_tests.postgres import PG

    return {"DAGSTER_PG_HOST": PG["host"], "DAGSTER_PG_PORT": str(PG["port"]), "DAGSTER_PG_USER": PG["user"],
            "DAGSTER_PG_PASSWORD": PG["password"], "DAGSTER_PG_DB": dbname}


def write_instance_config(home: Path, *, max_concurrent_runs: int | None = None,
                          dequeue_interval_seconds: int = 1) -> dict[str, Any]:
    """Copy deploy/dagster.yaml into `home` with test-sized limits; returns the config written."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = dequeue_interval_seconds
    if max_concurrent_runs is not None:
        config["concurrency"]["runs"]["max_concurrent_runs"] = max_concurrent_runs
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def wait_for(condition: Callable[[], T], timeout: float, what: str, *, interval: float = 0.5,
             diagnostics: Callable[[], str] | None = None) -> T:
    """Poll `condition` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not ready yet (connection refused, half-loaded location, …)
            last_error = exc
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error else ""
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{detail}"
                       + (f"\n{diagnostics()}" if diagnostics else ""))


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text[-lines:])


@dataclass
class DagsterServices:
    """Running webserver and/or daemon: their URL, environment, GraphQL helpers and logs."""

    home: Path
    env: dict[str, str]
    port: int
    services: list[Service] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        """POST a GraphQL query to the webserver; the `data` of the answer (errors raise)."""
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": dict(variables or {})},
                                 timeout=timeout)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)

    def job_names(self) -> set[str]:
        data = self.graphql("{ repositoriesOrError { __typename ... on RepositoryConnection "
                            "{ nodes { pipelines { name } } } ... on PythonError { message } } }")
        result = data["repositoriesOrError"]
        if result["__typename"] != "RepositoryConnection":
            raise RuntimeError(f"code location not loaded: {result}")
        return {job["name"] for node in result["nodes"] for job in node["pipelines"]}

    def run_status(self, run_id: str) -> str:
        data = self.graphql("query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }",
                            {"id": run_id})
        return data["runOrError"].get("status") or data["runOrError"]["__typename"]

    def diagnostics(self, lines: int = 60) -> str:
        """The tail of every service's log, for error messages."""
        return "\n".join(f"--- {s.name} (exit code {s.process.poll()}) log {s.log_path}:\n{s.log_tail(lines)}"
                         for s in self.services)

    def run_errors(self, run_id: str) -> str:
        """The error-level messages and errors of a run's event log, for error messages."""
        query = """query ($runId: ID!) { logsForRun(runId: $runId) { __typename
            ... on EventConnection { events { __typename
                ... on MessageEvent { message level stepKey }
                ... on ErrorEvent { error { message stack } } } } } }"""
        try:
            events = self.graphql(query, {"runId": run_id})["logsForRun"].get("events") or []
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"run {run_id}: its events could not be read ({exc})"
        lines = [f"{e.get('level')} {e.get('stepKey') or ''} {e['__typename']}: {e.get('message')}"
                 + (f"\n{e['error']['message']}{''.join(e['error']['stack'] or [])}" if e.get("error") else "")
                 for e in events if e.get("error") or e.get("level") in ("ERROR", "CRITICAL")]
        return f"--- run {run_id} errors:\n" + "\n".join(lines)

    def check_alive(self) -> None:
        for service in self.services:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with code {service.process.returncode}\n"
                                   + self.diagnostics())


def unavailable(problem: str) -> NoReturn:
    """A service or package a test needs is missing: a failure under CI (`.ci/run` provides it), a skip locally."""
    if os.environ.get("CI"):
        pytest.fail(f"required under CI: {problem}")
    pytest.skip(problem)


def service_env(home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The outer environment without its LLM/workflow settings, plus DAGSTER_HOME and `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _AMBIENT}
    env.update({"DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra})
    return env


def _script(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _start(name: str, args: list[str], env: Mapping[str, str], logs: Path) -> Service:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(name, process, log_path)


def _stop(service: Service, timeout: float = 20) -> None:
    """SIGTERM the service's process group (its code server and run workers too), SIGKILL if it lingers."""
    if service.process.poll() is None:
        try:
            os.killpg(service.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            service.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # children may outlive the leader: kill what is left of the group
        os.killpg(service.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if service.process.poll() is None:
        service.process.wait(timeout=5)


def _daemons_healthy(services: DagsterServices) -> bool:
    services.check_alive()
    data = services.graphql("{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }")
    statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
    required = [s for s in statuses if s["required"]]
    return bool(required) and all(s["healthy"] for s in required)


def _webserver_ready(services: DagsterServices) -> bool:
    services.check_alive()
    return "research_report" in services.job_names()


@contextmanager
def dagster_services(home: Path, env: Mapping[str, str] | None = None, *, daemon: bool = True,
                     startup_timeout: float = 180) -> Iterator[DagsterServices]:
    """Run `dagster-webserver` (and `dagster-daemon`) against DAGSTER_HOME=`home` until the block ends."""
    logs = home / "service_logs"
    logs.mkdir(parents=True, exist_ok=True)
    services = DagsterServices(home, service_env(home, env or {}), free_port())
    workspace = str(REPO / "workspace.yaml")
    try:
        services.services.append(_start(
            "webserver", [_script("dagster-webserver"), "-h", "127.0.0.1", "-p", str(services.port), "-w", workspace],
            services.env, logs))
        if daemon:
            services.services.append(_start("daemon", [_script("dagster-daemon"), "run", "-w", workspace],
                                            services.env, logs))
        wait_for(lambda: _webserver_ready(services), startup_timeout, f"the webserver on {services.url}",
                 diagnostics=services.diagnostics, interval=1)
        if daemon:
            wait_for(lambda: _daemons_healthy(services), startup_timeout, "dagster-daemon to report healthy",
                     diagnostics=services.diagnostics, interval=1)
        yield services
    finally:
        for service in reversed(services.services):
            _stop(service)
