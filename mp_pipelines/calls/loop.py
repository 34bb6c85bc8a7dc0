"""One asyncio event loop per process, in a daemon thread, that runs every LLM call of that process.

Ops run in threads (the concurrent executor) or processes (multiprocess); their calls all land on
this loop, so the async client's connection pool, the per-model rate limiters and a fan-out's
breadth semaphore are shared by every shard of the process. It holds no workflow data: only
connections and limiters, like a connection pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
# How often a waiting op asks whether its run is being terminated (a database read each time; the
# executor itself reacts to termination at once, this only cancels the calls it leaves behind).
STOP_POLL_SECONDS = 5.0
CLEANUP_SECONDS = 20.0  # most a cancelled `run` waits for its coroutine's cleanup


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with dagster-webserver's uvicorn): less CPU per call on the loop
    that makes every HTTP request of the process; the stock loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class BackgroundLoop:
    """An event loop running forever in a daemon thread; `run` submits a coroutine and waits for it."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._serve, name="mp-llm-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], *, should_stop: Callable[[], bool] | None = None,
            poll_seconds: float = STOP_POLL_SECONDS) -> T:
        """Run `coro` on the loop and wait for it; cancel it when `should_stop()` turns true.

        Cancelled, it waits up to CLEANUP_SECONDS for the coroutine to finish its cleanup (batch mode cancels
        its batches on the endpoint), so that a stopping process does not exit in the middle of it."""
        ended = threading.Event()
        future = self.submit(_signalling(coro, ended))
        while True:
            try:
                return future.result(timeout=poll_seconds if should_stop else None)
            except concurrent.futures.TimeoutError:
                if should_stop is not None and should_stop():
                    future.cancel()
                    ended.wait(CLEANUP_SECONDS)
                    raise concurrent.futures.CancelledError("the run is being terminated") from None
            except BaseException:
                future.cancel()  # e.g. KeyboardInterrupt in the waiting thread: do not leave calls running
                ended.wait(CLEANUP_SECONDS)
                raise


async def _signalling(coro: Coroutine[Any, Any, T], ended: threading.Event) -> T:
    try:
        return await coro
    finally:
        ended.set()


_LOOP: BackgroundLoop | None = None
_LOCK = threading.Lock()


def shared_loop() -> BackgroundLoop:
    """This process's loop, started on first use."""
    global _LOOP
    with _LOCK:
        if _LOOP is None:
            calm_the_collector()
            _LOOP = BackgroundLoop()
        return _LOOP


YOUNG_COLLECTION_THRESHOLD = 10_000  # allocations between young collections (Python's default is 700)


def calm_the_collector() -> None:
    """Keep Python's cyclic garbage collector from stalling the loop, once per process.

    By the first LLM call a run worker holds Dagster, the job and its resources, which live until it exits;
    a fan-out then allocates thousands of short-lived objects a second. Each full collection scanned the
    whole heap (~0.2 s at 300 MB, holding the GIL) and a 10,000-item run triggered ~20 of them: 5 s in which
    no call was sent or answered. Freezing what exists now takes it out of every scan, and collecting the
    young generation every 10,000 allocations instead of 700 lets short-lived objects die before they are
    promoted: 0.6 s of collection per 10,000 items (docs/performance.md). A threshold that is not Python's
    default was set on purpose and is kept.
    """
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young == 700:
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def _forget_after_fork() -> None:
    # A forked child inherits the object but not the thread: start a fresh loop on first use.
    global _LOOP, _LOCK
    _LOOP, _LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
