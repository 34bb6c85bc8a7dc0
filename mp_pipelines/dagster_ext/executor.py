"""`concurrent_executor`: run the ready steps of a run at once, on threads of the run worker process.

Written against Dagster 1.13.27 (`compat.DAGSTER_VERSION`); with `postgres.py`, the only module of
mp_pipelines allowed to touch Dagster internals. The orchestration loop follows
`dagster/_core/executor/multiprocess.py` (one thread feeds ActiveExecution, polls for interrupts, reports
interrupted steps); each step runs through the in-process executor's own path
(`dagster/_core/execution/plan/execute_plan.py`), so retries, IO managers, hooks and step contexts behave
as they do there. The private names used (imports, the ActiveExecution / DagsterEvent members called, the
Executor members overridden) are listed in `compat.py` and checked by mp_pipelines_tests/test_architecture.py;
re-check them, and this module, whenever the Dagster pin moves. One behaviour it relies on is not a name:
the order of a step's events, STEP_OUTPUT then HANDLED_OUTPUT once the IO manager stored it
(`_StoredOutputs` feeds outputs to ActiveExecution only then).

Threads, not asyncio: ops, resources, IO managers and hooks are synchronous code. An asyncio executor
must re-implement Dagster's step pipeline as coroutines (the community `dagster-async-executor` 0.0.x
copies ~1,000 lines of it) and still blocks its loop on every sync call; threads reuse Dagster's code as is.
"""

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from typing import Any

import dagster as dg
from dagster._core.definitions.executor_definition import (
    IN_PROC_CONFIG,
    MULTI_PROC_CONFIG,
    multiple_process_executor_requirements,
)
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.api import ExecuteRunWithPlanIterable
from dagster._core.execution.compute_logs import create_compute_log_file_key
from dagster._core.execution.context.system import (
    PlanExecutionContext,
    PlanOrchestrationContext,
    StepExecutionContext,
)
from dagster._core.execution.context_creation_job import PlanExecutionContextManager
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.execute_plan import (
    _trigger_hook,
    dagster_event_sequence_for_step,
)
from dagster._core.execution.plan.instance_concurrency_context import (
    InstanceConcurrencyContext,
)
from dagster._core.execution.plan.objects import (
    ErrorSource,
    step_failure_event_from_exc_info,
)
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.step_dependency_config import (
    StepDependencyConfig,
    get_step_dependency_config_field,
)
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor
from dagster._utils.error import serializable_error_info_from_exc_info

# Longest the orchestrating thread waits between checks for interrupts, due retries and free pool slots.
_POLL_SECONDS = 0.1

CONCURRENT_EXECUTOR_CONFIG: dict[str, Any] = {
    "max_concurrent": dg.Field(dg.Int, default_value=64, description="Most steps in flight at once in this run."),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    "retries": get_retries_config(),
    "step_dependency_config": get_step_dependency_config_field(),
}

# What a step thread reports: (thread, event) for each event, then (thread, None, error or None) when done.
Message = tuple["_StepThread", DagsterEvent | None, BaseException | None]


class _StepThread:
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
            if not any(_is_terminal(event) for event in events):
                self._send(step_failure_event_from_exc_info(
                    self.step_context, sys.exc_info(), error_source=ErrorSource.UNEXPECTED_ERROR))
            error = exc
        finally:
            self._send(None, error)


def _is_terminal(event: DagsterEvent) -> bool:
    return event.is_step_success or event.is_step_failure or event.is_step_up_for_retry


class _Threads:
    """The run's step threads: which attempt owns each in-flight step, and which threads are still alive."""

    def __init__(self) -> None:
        self.outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.in_flight: dict[str, _StepThread] = {}  # step key → its current attempt, until a terminal event
        self.alive: set[_StepThread] = set()  # may outlive in_flight while hooks run

    def launch(self, step_context: StepExecutionContext) -> None:
        """Start a step on its own thread."""
        worker = _StepThread(step_context, self.outbox)
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

    def settle(self, worker: _StepThread) -> bool:
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


class _StoredOutputs:
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


def _capture_run_logs(stack: ExitStack, job_context: PlanExecutionContext, plan: ExecutionPlan) -> Iterator[DagsterEvent]:
    """Capture stdout/stderr once for the whole run, as the in-process executor does."""
    # Capture redirects the process's file descriptors, so it cannot be split per step while steps overlap.
    manager = job_context.instance.compute_log_manager
    log_key = manager.build_log_key_for_run(job_context.run_id, create_compute_log_file_key())
    try:
        log_context = stack.enter_context(manager.capture_logs(log_key))
    except Exception:  # noqa: BLE001 - as in process: broken log capture is reported, the run goes on
        yield _engine_error(job_context, "Exception while setting up compute log capture")
        return
    step_keys = [step.key for step in plan.get_steps_to_execute_in_topo_order()]
    yield DagsterEvent.capture_logs(job_context, step_keys, log_key, log_context)


def _engine_error(job_context: PlanExecutionContext, message: str, **metadata: Any) -> DagsterEvent:
    error = serializable_error_info_from_exc_info(sys.exc_info())
    metadata = {key: dg.MetadataValue.text(str(value)) for key, value in metadata.items()}
    return DagsterEvent.engine_event(job_context, message, EngineEventData(metadata=metadata, error=error))


def _orchestrate(
    job_context: PlanExecutionContext,
    execution_plan: ExecutionPlan,
    max_concurrent: int,
    tag_concurrency_limits: list[dict[str, Any]] | None,
) -> Iterator[DagsterEvent]:
    """Launch ready steps on threads; yield their events in arrival order and feed each to ActiveExecution."""
    threads = _Threads()
    stored = _StoredOutputs()
    with ExitStack() as stack:
        pools = stack.enter_context(InstanceConcurrencyContext(job_context.instance, job_context.dagster_run))
        active = stack.enter_context(ActiveExecution(
            execution_plan,
            retry_mode=job_context.retry_mode,
            max_concurrent=max_concurrent,
            tag_concurrency_limits=tag_concurrency_limits,
            instance_concurrency_context=pools,
            step_dependency_config=job_context.step_dependency_config,
        ))
        capture = stack.enter_context(ExitStack())
        yield from _capture_run_logs(capture, job_context, execution_plan)
        try:
            while not active.is_complete or threads.alive:
                # Dagster captures SIGINT (how run termination arrives) as a flag; the multiprocess loop polls it too.
                if active.check_for_interrupts():
                    raise DagsterExecutionInterruptedError()
                steps = active.get_steps_to_execute(limit=max(0, max_concurrent - len(threads.alive)))
                yield from active.concurrency_event_iterator(job_context)
                known_state = active.get_known_state() if steps else None
                for step in steps:
                    threads.launch(job_context.for_step(step, known_state))

                due = active.sleep_interval()  # a delayed retry or a pool re-check
                for worker, event, error in threads.messages(min(_POLL_SECONDS, due) if due > 0 else _POLL_SECONDS):
                    if event is not None:
                        yield event
                        for ready in stored.feed(event):
                            active.handle_event(ready)
                        if _is_terminal(event):
                            threads.settle(worker)
                        continue
                    threads.alive.discard(worker)
                    if threads.settle(worker):  # the thread ended without a success, failure or retry event
                        active.verify_complete(job_context, worker.key)
                    if error is not None:
                        raise error  # as in process: an exception escaping a step ends the run
                yield from active.plan_events_iterator(job_context)
        except (KeyboardInterrupt, DagsterExecutionInterruptedError):
            active.mark_interrupted()
            yield DagsterEvent.engine_event(
                job_context,
                "Concurrent executor: received termination signal - reporting in-flight steps as interrupted;"
                " their threads cannot be stopped and are left to end as daemon threads",
                EngineEventData.interrupted(sorted(threads.in_flight)),
            )
            yield from threads.fail_in_flight(active, sys.exc_info(), ErrorSource.INTERRUPT)
            raise
        except Exception:
            if threads.in_flight:
                yield _engine_error(job_context, "Unexpected exception while steps were still in progress -"
                                    " reporting them as failed:", steps_interrupted=sorted(threads.in_flight))
                yield from threads.fail_in_flight(active, sys.exc_info(), ErrorSource.FRAMEWORK_ERROR)
            raise
        finally:
            for worker in threads.alive:
                worker.abandon()

        try:
            capture.close()
        except Exception:  # noqa: BLE001 - as in process
            yield _engine_error(job_context, "Exception while cleaning up compute log capture")


class ConcurrentExecutor(Executor):
    """Runs up to `max_concurrent` steps of a run at once on threads of the run worker."""

    def __init__(
        self,
        retries: RetryMode,
        max_concurrent: int,
        tag_concurrency_limits: list[dict[str, Any]] | None = None,
        step_dependency_config: StepDependencyConfig | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise dg.DagsterInvalidConfigError(
                f"Executor `concurrent`: max_concurrent must be at least 1, got {max_concurrent}.", [], max_concurrent
            )
        self._retries = retries
        self._max_concurrent = max_concurrent
        self._tag_concurrency_limits = tag_concurrency_limits
        self._step_dependency_config = step_dependency_config or StepDependencyConfig.default()

    @property
    def retries(self) -> RetryMode:
        return self._retries

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return self._step_dependency_config

    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan) -> Iterator[DagsterEvent]:
        """Initialise resources once for the run, as in process, then orchestrate the steps on threads."""
        step_keys = execution_plan.step_keys_to_execute
        yield DagsterEvent.engine_event(
            plan_context,
            f"Executing steps concurrently in process (pid: {os.getpid()}, max_concurrent: {self._max_concurrent})",
            EngineEventData.in_process(os.getpid(), step_keys),
        )
        started = time.perf_counter()
        yield from ExecuteRunWithPlanIterable(
            execution_plan=plan_context.execution_plan,
            iterator=partial(
                _orchestrate, max_concurrent=self._max_concurrent, tag_concurrency_limits=self._tag_concurrency_limits
            ),
            execution_context_manager=PlanExecutionContextManager(
                job=plan_context.job,
                retry_mode=plan_context.retry_mode,
                execution_plan=plan_context.execution_plan,
                run_config=plan_context.run_config,
                dagster_run=plan_context.dagster_run,
                instance=plan_context.instance,
                raise_on_error=plan_context.raise_on_error,
                output_capture=plan_context.output_capture,
                step_dependency_config=self.step_dependency_config,
            ),
        )
        yield DagsterEvent.engine_event(
            plan_context,
            f"Finished steps concurrently in process (pid: {os.getpid()}) in {time.perf_counter() - started:.2f}s",
            EngineEventData.in_process(os.getpid(), step_keys),
        )


@dg.executor(name="concurrent", config_schema=CONCURRENT_EXECUTOR_CONFIG)
def concurrent_executor(init_context: dg.InitExecutorContext) -> ConcurrentExecutor:
    """Run up to `max_concurrent` ready steps at once on threads of the run worker, for I/O-bound ops."""
    config = init_context.executor_config
    return ConcurrentExecutor(
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
        max_concurrent=config["max_concurrent"],
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        step_dependency_config=StepDependencyConfig.from_config(config.get("step_dependency_config")),
    )


# ---- the executor generated jobs name: concurrent by default, Dagster's stock ones on request ----


def _selected_requirements(config: dict[str, Any]) -> list[dg.ExecutorRequirement]:
    return list(multiple_process_executor_requirements()) if "multiprocess" in config else []


@dg.executor(
    name="selectable",
    config_schema=dg.Field(
        dg.Selector({"concurrent": dg.Field(CONCURRENT_EXECUTOR_CONFIG), "multiprocess": MULTI_PROC_CONFIG,
                     "in_process": IN_PROC_CONFIG}),
        default_value={"concurrent": {}},
    ),
    requirements=_selected_requirements,
)
def selectable_executor(init_context: dg.InitExecutorContext) -> Executor:
    """The concurrent executor, or Dagster's multiprocess or in-process one, chosen per run in run config."""
    ((kind, options),) = init_context.executor_config.items()
    if kind == "concurrent":
        chosen, config = concurrent_executor, options
    else:
        chosen, config = dg.multi_or_in_process_executor, {kind: options}
    return chosen.executor_creation_fn(  # type: ignore[misc]
        dg.InitExecutorContext(job=init_context.job, executor_def=chosen, executor_config=config,
                               instance=init_context.instance))
