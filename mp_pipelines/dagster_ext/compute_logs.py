"""Dagster's local compute logs (the stdout/stderr files the UI shows for a run), mirrored to the terminal by a thread.

Written against **dagster 1.13.27**; every Dagster internal used here is listed in `compat.py`.

Dagster's `LocalComputeLogManager` points the process's stdout and stderr descriptors at files under
`<base_dir>/<run id>/…` while a run (or a step process) runs, and copies each file back to the terminal with a
`tail -F` process, watched by a Python process that kills the `tail` should the run's process die: four processes
per capture, about 0.1 s of a short run and the CPU of two interpreter starts. `MirroredComputeLogManager` writes the
same files in the same place (the UI, `dagster` and a stock `LocalComputeLogManager` read them as before) and copies
them to the terminal from a daemon thread of the capturing process instead, which cannot outlive it. The thread reads
what was appended every `MIRROR_SECONDS` and once more when the capture ends, so nothing written before the end is
left out of the terminal (`tail -F` checks once a second and can miss the last lines).
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dagster import DagsterInvariantViolationError, Field, StringSource
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._serdes import ConfigurableClassData

from mp_pipelines.dagster_ext.compat import checked_overrides

MIRROR_SECONDS = 0.1  # how often the terminal gets what was captured since


@checked_overrides
class MirroredComputeLogManager(LocalComputeLogManager):
    """`LocalComputeLogManager` whose captures copy to the terminal from a thread, not `tail` processes."""

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {**super().config_type(), "base_dir": Field(
            StringSource, is_required=False,
            description="Where the captured output goes; default <DAGSTER_HOME>/storage, Dagster's own default.")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> MirroredComputeLogManager:
        config = dict(config_value)
        if config.get("base_dir") is None:
            config["base_dir"] = _home_storage()
        return cls(inst_data=inst_data, **config)

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Iterator[CapturedLogContext]:
        out_path = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        err_path = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        with mirrored(sys.stdout, out_path), mirrored(sys.stderr, err_path):
            yield CapturedLogContext(log_key)
        _touched(self.complete_artifact_path(log_key))  # as Dagster: the capture is complete


def _home_storage() -> str:
    """<DAGSTER_HOME>/storage: where Dagster keeps a local instance's compute logs unless told otherwise."""
    home = os.environ.get("DAGSTER_HOME", "").strip()
    if not home:
        raise DagsterInvariantViolationError(
            "compute_logs: MirroredComputeLogManager has no base_dir and DAGSTER_HOME is not set; set one of them")
    return os.path.join(os.path.expanduser(home), "storage")


def compute_logs_config(base_dir: str) -> dict[str, Any]:
    """The `compute_logs:` entry of an instance config for this manager, storing under `base_dir`."""
    return {"module": __name__, "class": "MirroredComputeLogManager", "config": {"base_dir": base_dir}}


@contextmanager
def mirrored(stream: IO[Any], path: str) -> Iterator[None]:
    """Point `stream`'s file descriptor at the file `path` (appending) and copy what arrives there to where the
    descriptor pointed before. A stream without a descriptor (a test runner's capture) is left alone, as Dagster does."""
    _touched(path)
    descriptor = _descriptor(stream)
    if descriptor is None:
        yield
        return
    stream.flush()
    with open(path, "ab", buffering=0) as sink:
        copier = _Copier(path, os.dup(descriptor))
        try:
            os.dup2(sink.fileno(), descriptor)
        except BaseException:
            copier.finish()
            raise
        try:
            yield
        finally:
            try:
                stream.flush()
            finally:
                os.dup2(copier.terminal, descriptor)
                copier.finish()


def _touched(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).touch()


def _descriptor(stream: IO[Any]) -> int | None:
    try:
        descriptor = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None
    return descriptor if isinstance(descriptor, int) else None


class _Copier(threading.Thread):
    """Copies what is appended to the file `path` to the descriptor `terminal` until `finish()`, then the rest; it
    owns `terminal` and closes it when it ends (never while a write to it may still run)."""

    def __init__(self, path: str, terminal: int) -> None:
        super().__init__(name="mp-compute-log-mirror", daemon=True)
        self.terminal, self._done, self._broken = terminal, threading.Event(), False
        try:
            self._source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the thread when it ends
        except BaseException:
            os.close(terminal)
            raise
        self.start()

    def run(self) -> None:
        try:
            while not self._done.wait(MIRROR_SECONDS):
                self._copy()
            self._copy()
        finally:
            self._source.close()
            os.close(self.terminal)

    def finish(self) -> None:
        self._done.set()
        self.join()

    def _copy(self) -> None:
        while chunk := self._source.read(1 << 16):
            if self._broken:
                continue  # the terminal is gone (a closed pipe): the file keeps everything
            view = memoryview(chunk)
            try:
                while view:
                    try:
                        view = view[os.write(self.terminal, view):]
                    except BlockingIOError:  # a non-blocking pipe that is full: wait until it drains
                        select.select([], [self.terminal], [], 1.0)
            except OSError:
                self._broken = True
