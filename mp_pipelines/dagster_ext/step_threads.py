"""The step threads of `concurrent_executor`: one step attempt per thread, and what reaches ActiveExecution.

Written against Dagster 1.13.27 (`compat.DAGSTER_VERSION`), as part of the concurrent executor
(`executor.py` orchestrates; this module runs the steps). Each step runs through the in-process
executor's own path (`dagster/_core/execution/plan/execute_plan.py`: `dagster_event_sequence_for_step`,
then `_trigger_hook`), so retries, IO managers, hooks and step contexts behave as they do there. The
private names used are listed in `compat.py` and checked by mp_pipelines_tests/test_architecture.py.

One behaviour relied on is not a name: the order of a step's events, STEP_OUTPUT then HANDLED_OUTPUT once
the IO manager stored it (`StoredOutputs` feeds outputs to ActiveExecution only then).
"""

import queue
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.execute_plan import (
    _trigger_hook,
    dagster_event_sequence_for_step,
)
from dagster._core.execution.plan.objects import (
    ErrorSource,
    step_failure_event_from_exc_info,
)

# What a step thread reports: (thread, event) for each event, then (thread, None, error or None) when done.
Message = tuple["StepThread", DagsterEvent | None, BaseException | None]


class StepThread:
    """One attempt of one step on a daemon thread, reporting its events to the orchestrator's outbox."""

    def __init__(self, step_context: StepExecutionContext, outbox: "queue.SimpleQueue[Message]") -> None:
        self.step_context = step_context
        self.key: str = step_context.step.key
        self._outbox = outbox
        self._abandoned = threading.Event()
        # Daemon: a thread stuck in I/O must not keep a terminated run worker alive.
        self._thread = threading.Thread(target=self._run, name=f"dagster-step:{self.key}", daemon=True)

    def start(self) -> None:
        """Start the step on its thread."""
        self._thread.start()

    def abandon(self) -> None:
        """Stop forwarding events and skip hooks; Python cannot interrupt the thread itself."""
        self._abandoned.set()

    def _send(self, event: DagsterEvent | None, error: BaseException | None = None) -> None:
        if not self._abandoned.is_set():
            self._outbox.put((self, event, error))

    def _run(self) -> None:
        events: list[DagsterEvent] = []
        error: BaseException | None = None
        try:
            for event in dagster_event_sequence_for_step(self.step_context):
                events.append(event)
                self._send(event)
            if not self._abandoned.is_set():
                for event in _trigger_hook(self.step_context, events):
                    self._send(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the orchestrating thread, which re-raises it
            if not any(is_terminal(event) for event in events):
                self._send(step_failure_event_from_exc_info(
                    self.step_context, sys.exc_info(), error_source=ErrorSource.UNEXPECTED_ERROR))
            error = exc
        finally:
            self._send(None, error)


def is_terminal(event: DagsterEvent) -> bool:
    """Whether the event ends a step attempt: success, failure or up for retry."""
    return event.is_step_success or event.is_step_failure or event.is_step_up_for_retry


class StepThreads:
    """The run's step threads: which attempt owns each in-flight step, and which threads are still alive."""

    def __init__(self) -> None:
        self.outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.in_flight: dict[str, StepThread] = {}  # step key → its current attempt, until a terminal event
        self.alive: set[StepThread] = set()  # may outlive in_flight while hooks run

    def launch(self, step_context: StepExecutionContext) -> None:
        """Start a step on its own thread."""
        worker = StepThread(step_context, self.outbox)
        self.in_flight[worker.key] = worker
        self.alive.add(worker)
        worker.start()

    def messages(self, timeout: float) -> Iterator[Message]:
        """Wait up to `timeout` for one message, then drain the ones already queued."""
        try:
            yield self.outbox.get(timeout=timeout)
            while True:
                yield self.outbox.get_nowait()
        except queue.Empty:
            return

    def settle(self, worker: StepThread) -> bool:
        """Forget `worker`'s step as in flight; True if it was still the step's current attempt."""
        if self.in_flight.get(worker.key) is worker:
            del self.in_flight[worker.key]
            return True
        return False  # a newer attempt (a retry) owns the key now

    def fail_in_flight(self, active: ActiveExecution, exc_info: Any, source: ErrorSource) -> Iterator[DagsterEvent]:
        """Report every in-flight step as failed (freeing its pool slot) and stop listening to its thread."""
        for key in sorted(self.in_flight):
            worker = self.in_flight.pop(key)
            worker.abandon()
            failure = step_failure_event_from_exc_info(worker.step_context, exc_info, error_source=source)
            yield failure
            active.handle_event(failure)

    def abandon_alive(self) -> None:
        """Stop listening to every thread still running (the run is over for this orchestrator)."""
        for worker in self.alive:
            worker.abandon()


class StoredOutputs:
    """Passes a step's outputs to ActiveExecution only once its IO manager has stored them.

    Dagster (1.13.27) emits STEP_OUTPUT before `handle_output` writes the value and HANDLED_OUTPUT after;
    ActiveExecution marks the output available on STEP_OUTPUT, so with `require_upstream_step_success:
    false` a consumer thread could start and find no stored value. Outputs are held until their
    HANDLED_OUTPUT (or the step's success); a step that fails first never makes them available.
    """

    def __init__(self) -> None:
        self._pending: dict[str, deque[DagsterEvent]] = {}

    def feed(self, event: DagsterEvent) -> list[DagsterEvent]:
        """The events to hand to ActiveExecution now, in order."""
        key = event.step_key or ""
        if event.is_successful_output:
            self._pending.setdefault(key, deque()).append(event)
            return []
        if event.is_handled_output:
            waiting = self._pending.get(key)
            return [waiting.popleft(), event] if waiting else [event]
        if event.is_step_success:
            return [*self._pending.pop(key, ()), event]
        if event.is_step_failure or event.is_step_up_for_retry:
            self._pending.pop(key, None)
        return [event]
