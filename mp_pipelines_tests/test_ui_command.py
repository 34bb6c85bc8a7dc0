"""`mp-pipelines ui`: the real dagster-webserver and dagster-daemon on the instance `mp-pipelines run` uses.

A run made with `mp-pipelines run` in a folder is visible through the webserver's GraphQL API that `mp-pipelines
ui` starts in the same folder, the daemon reports healthy on that instance, nothing warns, and SIGINT (Ctrl-C)
stops the webserver, the daemon and everything they started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from mp_pipelines_tests.services import free_port, wait_for


def cli() -> list[str]:
    exe = shutil.which("mp-pipelines")
    return [exe] if exe else [sys.executable, "-m", "mp_pipelines.cli"]


def run_cli(cwd: Path, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`mp-pipelines ARGS` in a child process in `cwd`, its output captured as text."""
    return subprocess.run([*cli(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def offline_env() -> dict[str, str]:
    drop = ("DAGSTER_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL", "MP_LLM_PROVIDER", "MP_WORKFLOWS_PATH")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}


def graphql(port: int, query: str) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` still exists and is no zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def using_home(home: Path) -> list[int]:
    """Processes whose environment has DAGSTER_HOME=home (the services, their code servers, run workers)."""
    marker = f"DAGSTER_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_ui_shows_cli_runs_on_one_instance_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    env = offline_env()
    made = run_cli(tmp_path, env, "run", "research_report", "-i", "topic=shared instances", "-i", "max_questions=1",
                   "--json", "--executor", "in_process")
    assert made.returncode == 0, made.stderr[-3000:]
    run_id = json.loads(made.stdout)["run_id"]
    home = (tmp_path / ".mp_pipelines" / "dagster_home").resolve()

    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([*cli(), "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def diagnostics() -> str:
            return log.read_text(errors="replace")[-3000:]

        def sees_the_cli_run() -> bool:
            data = graphql(port, "{ runsOrError { ... on Runs { results { runId status jobName } } } }")
            return any(r["runId"] == run_id and r["status"] == "SUCCESS" for r in data["runsOrError"]["results"])

        wait_for(sees_the_cli_run, 180, f"the CLI's run {run_id} in the UI on port {port}", interval=1,
                 diagnostics=diagnostics)

        def daemon_healthy() -> bool:
            data = graphql(port, "{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }")
            required = [s for s in data["instance"]["daemonHealth"]["allDaemonStatuses"] if s["required"]]
            return bool(required) and all(s["healthy"] for s in required)

        wait_for(daemon_healthy, 180, "dagster-daemon healthy on the CLI's instance", interval=1,
                 diagnostics=diagnostics)
        jobs = graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } } } } }")
        names = {job["name"] for node in jobs["repositoriesOrError"]["nodes"] for job in node["jobs"]}
        assert "research_report" in names
        services = children(ui.pid)
        assert len(services) == 2, services  # dagster-webserver and dagster-daemon
        assert (home / "dagster.yaml").is_file()  # written for the shared instance, so Dagster does not warn
        started = using_home(home)
        assert set(services) <= set(started)
    finally:
        ui.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()
            raise
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (any(alive(pid) for pid in services) or using_home(home)):
        time.sleep(0.2)
    assert not [pid for pid in services if alive(pid)], "the webserver and the daemon are stopped"
    assert not using_home(home), "nothing they started is left running"
    assert "stopping dagster-webserver and dagster-daemon" in output
    assert "warning" not in output.lower(), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_the_instance_config_is_kept_when_the_home_has_one(tmp_path: Path, monkeypatch: Any) -> None:
    from mp_pipelines.cli.ui import ensure_instance_config, instance_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = instance_home()
    assert home == (tmp_path / "home").resolve() and home.is_dir()
    (home / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    assert ensure_instance_config(home).read_text() == "telemetry: {enabled: false}\n"
    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.chdir(tmp_path)
    assert instance_home() == (tmp_path / ".mp_pipelines" / "dagster_home").resolve()


def test_the_cli_runs_on_the_instance_ui_made_without_dagster_home(tmp_path: Path) -> None:
    """`mp-pipelines ui` first (its dagster.yaml names the storage by `env: DAGSTER_HOME`), then `run` and `stats`
    in the same folder with no DAGSTER_HOME set: they open that instance, with no traceback."""
    from mp_pipelines.cli.ui import LOCAL_HOME, ensure_instance_config

    home = (tmp_path / LOCAL_HOME).resolve()
    home.mkdir(parents=True)
    ensure_instance_config(home)  # what `mp-pipelines ui` writes before it starts the webserver and the daemon
    env = offline_env()
    made = run_cli(tmp_path, env, "run", "research_report", "-i", "topic=after the ui", "-i", "max_questions=1",
                   "--json", "--executor", "multiprocess")
    assert made.returncode == 0, made.stderr[-3000:]
    run_id = json.loads(made.stdout)["run_id"]
    assert (home / "history" / "runs" / f"{run_id}.db").is_file()  # in the ui's storage (base_dir: DAGSTER_HOME)
    assert list((home / "storage" / run_id / "compute_logs").glob("*.out"))  # the ui's compute logs
    stats = run_cli(tmp_path, env, "stats", "--json", timeout=120)
    assert stats.returncode == 0 and json.loads(stats.stdout)[0]["workflow"] == "research_report", stats.stderr
