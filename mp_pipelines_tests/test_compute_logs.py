"""The compute logs of the CLI's local instance (mp_pipelines/dagster_ext/compute_logs.py): Dagster's files, which
the UI reads, copied to the terminal by a thread of the capturing process instead of `tail` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mp_pipelines.cli.running import local_instance
from mp_pipelines.cli.ui import INSTANCE_CONFIG
from mp_pipelines.dagster_ext.compute_logs import MirroredComputeLogManager, compute_logs_config
from mp_pipelines_tests import executor_jobs
from mp_pipelines_tests.test_executor import events_of, run_config

REPO = Path(__file__).resolve().parents[1]

CAPTURING_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys

    from mp_pipelines.dagster_ext.compute_logs import mirrored

    def no_process(*args, **kwargs):
        raise AssertionError(f"the capture started a process: {args}")

    subprocess.Popen = no_process
    print("before", flush=True)
    with mirrored(sys.stdout, sys.argv[1]), mirrored(sys.stderr, sys.argv[2]):
        print("from print", flush=True)
        os.write(1, b"from the descriptor\\n")
        os.write(2, b"to stderr\\n")
        sys.stdout.write("last line, still in the buffer\\n")
    print("after", flush=True)
""")


def test_captured_output_reaches_the_files_and_the_terminal_in_order_without_a_process(tmp_path: Path) -> None:
    out, err = tmp_path / "logs" / "run.out", tmp_path / "logs" / "run.err"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CAPTURING_SCRIPT, str(out), str(err)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    captured = "from print\nfrom the descriptor\nlast line, still in the buffer\n"
    assert out.read_text() == captured
    assert err.read_text() == "to stderr\n"
    assert done.stdout == f"before\n{captured}after\n"  # nothing lost at the end, nothing out of order
    assert done.stderr == "to stderr\n"


def test_a_run_captures_its_steps_output_with_the_mirrored_manager(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    overrides = {"telemetry": {"enabled": False}, "compute_logs": compute_logs_config(str(home / "storage"))}
    with dg.DagsterInstance.local_temp(str(home), overrides=overrides) as instance:
        assert isinstance(instance.compute_log_manager, MirroredComputeLogManager)
        result = dg.execute_job(dg.reconstructable(executor_jobs.hooked_fanout_job), instance=instance,
                                run_config=run_config(3, 0.05))
        assert result.success
        [captured] = events_of(instance, result.run_id, dg.DagsterEventType.LOGS_CAPTURED)
        manager = instance.compute_log_manager
        log_key = manager.build_log_key_for_run(result.run_id, captured.dagster_event.logs_captured_data.file_key)
        assert manager.is_capture_complete(log_key)
        stdout = manager.get_log_data(log_key).stdout.decode()
        assert all(f"stdout from item {i}" in stdout for i in range(3))
    # Dagster's own manager reads the same files (the UI of an instance configured without this class).
    with dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}}) as stock:
        assert type(stock.compute_log_manager) is not MirroredComputeLogManager
        assert "stdout from item 2" in stock.compute_log_manager.get_log_data(log_key).stdout.decode()


def _manager_class(instance: dg.DagsterInstance) -> str:
    return type(instance.compute_log_manager).__name__


def test_local_instance_mirrors_compute_logs_unless_the_home_chooses(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    with local_instance() as instance:
        assert _manager_class(instance) == "MirroredComputeLogManager"
        assert instance.get_ref().compute_logs_data.config_dict == {
            "base_dir": str((tmp_path / ".mp_pipelines" / "dagster_home" / "storage").resolve())}

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (home / "dagster.yaml").write_text(INSTANCE_CONFIG)  # what `mp-pipelines ui` writes: the webserver and daemon
    with local_instance() as instance:                   # read it too, so their runs mirror without `tail` as well
        assert _manager_class(instance) == "MirroredComputeLogManager"
        assert instance.compute_log_manager._base_dir == str(home / "storage")  # Dagster's default place
        assert instance.get_ref().storage_data.class_name == "PooledSqliteStorage"  # its storage kept
    with dg.DagsterInstance.get() as instance:  # as the webserver and the daemon open it
        assert isinstance(instance.compute_log_manager, MirroredComputeLogManager)
        assert instance.compute_log_manager._base_dir == str(home / "storage")
    (home / "dagster.yaml").write_text(
        f"compute_logs:\n  module: dagster.core.storage.noop_compute_log_manager\n  class: NoOpComputeLogManager\n"
        f"storage:\n  sqlite:\n    base_dir: {home}\n")  # both chosen: both kept
    with local_instance() as instance:
        assert _manager_class(instance) == "NoOpComputeLogManager"
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"


def test_without_base_dir_the_manager_needs_dagster_home(monkeypatch: Any) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with pytest.raises(dg.DagsterInvariantViolationError, match="has no base_dir and DAGSTER_HOME is not set"):
        MirroredComputeLogManager.from_config_value(None, {})
