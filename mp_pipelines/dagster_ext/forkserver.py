"""Step processes of a multiprocess run that see this process's environment as it is when the run starts.

Dagster's multiprocess executor forks its step processes from Python's forkserver, which a process starts once,
at its first such run, and then keeps: each step process is sent its working folder and sys.path, but inherits
the environment the forkserver was started in. A process that runs workflows one after another (`run_workflow`
in a notebook or a service) and changes its environment in between (OPENAI_API_KEY, OPENAI_BASE_URL,
MP_CACHE_URL, the working folder in MP_LOCAL_RUN_DIR) would have its steps call another provider or endpoint
than the run reports, look up and keep answers under another endpoint or in another cache (every cached answer
missed, and paid for again), or check inputs against other roots.

So before a run forks its steps, a forkserver started in another environment is let go (without waiting for it:
it exits once no process holds its pipe any more) and the run's executor starts a new one. While another run of
this process still has step processes on that forkserver, the run spawns its step processes instead. What of the
forkserver is read and let go is private to `multiprocessing.forkserver` (`_forkserver`, its `_lock`,
`_forkserver_pid`, `_forkserver_alive_fd` and `_forkserver_address`, in Python 3.11); without them a run in a
changed environment spawns its steps.
"""

import multiprocessing.forkserver
import multiprocessing.util
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import dagster as dg

from mp_pipelines.dagster_ext.compat import checked_overrides
from mp_pipelines.dagster_ext.delegating import DelegatingExecutor

_LOCK = threading.Lock()


class _Forkserver:
    """What this process knows of its forkserver: the environment it was started in (None: not started by a
    run here, so unknown) and how many runs here are using it."""

    environment: dict[str, str] | None = None
    runs = 0


def _claim() -> bool:
    """True when this run may fork its steps from the forkserver (which is then, or will be when the executor
    starts it, one of the current environment), False when it must spawn them; counted in `_Forkserver.runs`."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    environment = dict(os.environ)
    with _LOCK:
        running = getattr(server, "_forkserver_pid", None) is not None
        if running and _Forkserver.environment != environment:
            if _Forkserver.runs or _Forkserver.environment is None or not _detachable(server):
                return False  # in use, or not started here (someone else's): leave it alone
            _detach(server)
        _Forkserver.environment = environment
        _Forkserver.runs += 1
        return True


def _detachable(server: Any) -> bool:
    return all(hasattr(server, name) for name in ("_lock", "_forkserver_alive_fd", "_forkserver_address"))


def _detach(server: Any) -> None:
    """Let the old forkserver go without waiting for it (its own `_stop` waits until every process holding its
    "alive" pipe has ended, which may be never while a user's pool runs): close this process's end of the pipe, so
    the server exits once the others are gone, forget it, so the executor starts a new one, and reap it in a thread."""
    with server._lock:
        pid, alive, address = server._forkserver_pid, server._forkserver_alive_fd, server._forkserver_address
        server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    if alive is not None:
        with suppress(OSError):
            os.close(alive)
    if address and not multiprocessing.util.is_abstract_socket_namespace(address):
        with suppress(OSError):
            os.unlink(address)
    threading.Thread(target=_reap, args=(pid,), name="mp-forkserver-reaper", daemon=True).start()


def _reap(pid: int) -> None:
    with suppress(OSError):  # ChildProcessError: reaped elsewhere
        os.waitpid(pid, 0)


def _release() -> None:
    with _LOCK:
        _Forkserver.runs -= 1


@checked_overrides
class CurrentEnvironmentExecutor(DelegatingExecutor):
    """`forkserver`, Dagster's multiprocess executor on a forkserver, on one whose step processes see the current
    environment; `spawning()`, the same on spawned step processes, when that forkserver is in use by another run."""

    def __init__(self, forkserver: dg.Executor, spawning: Callable[[], dg.Executor]) -> None:
        super().__init__(forkserver)
        self._spawning = spawning

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        if not _claim():
            yield from self._spawning().execute(plan_context, execution_plan)
            return
        try:
            yield from self._inner.execute(plan_context, execution_plan)
        finally:
            _release()
