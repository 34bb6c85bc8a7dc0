"""`mp-pipelines ui`: the Dagster UI (dagster-webserver) and dagster-daemon on the instance the CLI uses.

`mp-pipelines run` stores its runs in DAGSTER_HOME, else ./.mp_pipelines/dagster_home; this command starts
both services on that same folder, so a run made in either shows in both. It does not use `dagster dev`,
which makes a temporary instance and warns when a dagster.yaml sits in the working folder. Ctrl-C (or SIGTERM)
stops both services and what they started (code servers, run workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click

CODE_LOCATION = "mp_pipelines.definitions"
LOCAL_HOME = Path(".mp_pipelines") / "dagster_home"  # the same folder as cli.running.LOCAL_HOME
# The instance config written to a home that has none: Dagster's SQLite storage in the home (pooled), a run queue,
# telemetry off (the settings of the repository's dagster.yaml). Without one, Dagster warns on every start.
INSTANCE_CONFIG = """\
# Written by `mp-pipelines ui` for the instance `mp-pipelines run` and the UI share: SQLite storage in this
# folder, a run queue, telemetry off. Edit freely; it is never overwritten.
telemetry:
  enabled: false

# Dagster's SQLite files in this folder, opened with one connection per file kept open instead of one per
# event (mp_pipelines/dagster_ext/sqlite.py); `storage: {sqlite: {base_dir: ...}}` opens the same files.
storage:
  custom:
    module: mp_pipelines.dagster_ext.sqlite
    class: PooledSqliteStorage
    config:
      base_dir:
        env: DAGSTER_HOME

# What runs print, kept where Dagster keeps it (<home>/storage) and shown in the UI; a thread of the run's process
# copies it to that process's terminal instead of Dagster's `tail` processes (mp_pipelines/dagster_ext/compute_logs.py).
compute_logs:
  module: mp_pipelines.dagster_ext.compute_logs
  class: MirroredComputeLogManager

concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: mp_pipelines/workflow
        value:
          applyLimitPerUniqueValue: true
        limit: 2
      - key: mp_pipelines/provider
        value: openai
        limit: 4
"""
STOP_SECONDS = 20.0


def instance_home() -> Path:
    """The CLI's instance folder: DAGSTER_HOME when set, else ./.mp_pipelines/dagster_home (created)."""
    configured = os.environ.get("DAGSTER_HOME")
    home = Path(configured).expanduser() if configured else Path.cwd() / LOCAL_HOME
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def ensure_instance_config(home: Path) -> Path:
    """The home's dagster.yaml, written with INSTANCE_CONFIG when there is none."""
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_CONFIG, encoding="utf-8")
    return config


def _script(name: str) -> str:
    """A console script of this Python environment (next to the interpreter), else found on PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise click.ClickException(f"{name} is not installed in this Python environment; "
                                   "pip install dagster-webserver (it is a dependency of mp-pipelines)")
    return found


def service_commands(host: str, port: int) -> dict[str, list[str]]:
    """The webserver's and the daemon's command lines, both loading the mp_pipelines code location."""
    return {
        "dagster-webserver": [_script("dagster-webserver"), "-h", host, "-p", str(port), "-m", CODE_LOCATION],
        "dagster-daemon": [_script("dagster-daemon"), "run", "-m", CODE_LOCATION],
    }


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM each service's process group, wait for it, SIGKILL what lingers."""
    for process in processes.values():
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # code servers and run workers may outlive their parent: end the whole group
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if process.poll() is None:
            process.wait(timeout=5)


class _Stop(Exception):
    """SIGINT or SIGTERM reached the ui command."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@click.command("ui")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535), help="The webserver's port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address the webserver listens on.")
def ui(port: int, host: str) -> None:
    """Start the Dagster UI and dagster-daemon on the CLI's instance (DAGSTER_HOME, else
    ./.mp_pipelines/dagster_home), so runs made with `mp-pipelines run` and in the UI show in both. Ctrl-C stops both."""
    home = instance_home()
    ensure_instance_config(home)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    commands = service_commands(host, port)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        for name, command in commands.items():
            # Their own process groups: the signal reaches them from here, once, and they stop what they started.
            processes[name] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        click.echo(f"Dagster UI on http://{host}:{port} with dagster-daemon, instance {home} "
                   "(the one `mp-pipelines run` uses); Ctrl-C stops both", err=True)
        while True:
            ended = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
            if ended:
                name, returncode = next(iter(ended.items()))
                click.echo(f"{name} stopped (exit code {returncode}); stopping the other service", err=True)
                code = 1
                break
            time.sleep(0.5)
    except _Stop:
        click.echo("stopping dagster-webserver and dagster-daemon", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(processes)
    sys.exit(code)
