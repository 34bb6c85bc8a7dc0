"""`concurrent_executor`: run the ready steps of a run at once, on threads of the run worker process.

Written against Dagster 1.13.27 (`compat.DAGSTER_VERSION`); like the rest of `mp_pipelines.dagster_ext`,
it may touch Dagster internals, which no other package of mp_pipelines may. The orchestration loop
(`_StepLoop`, here) follows `dagster/_core/executor/multiprocess.py` (one thread feeds ActiveExecution,
polls for interrupts, reports interrupted steps); each step runs on a thread of `step_threads.py`, through
the in-process executor's own path (`dagster/_core/execution/plan/execute_plan.py`), so retries, IO
managers, hooks and step contexts behave as they do there. The private names used (imports, the
ActiveExecution / DagsterEvent members called, the Executor members overridden) are listed in `compat.py`
and checked by mp_pipelines_tests/test_architecture.py; re-check them, this module and `step_threads.py`
whenever the Dagster pin moves. One behaviour it relies on is not a name: the order of a step's events,
STEP_OUTPUT then HANDLED_OUTPUT once the IO manager stored it (`StoredOutputs` feeds outputs to
ActiveExecution only then).

Threads, not asyncio: ops, resources, IO managers and hooks are synchronous code. An asyncio executor
must re-implement Dagster's step pipeline as coroutines (the community `dagster-async-executor` 0.0.x
copies ~1,000 lines of it) and still blocks its loop on every sync call; threads reuse Dagster's code as is.
"""

import os
import sys
import time
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
)
from dagster._core.execution.context_creation_job import PlanExecutionContextManager
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.instance_concurrency_context import (
    InstanceConcurrencyContext,
)
from dagster._core.execution.plan.objects import ErrorSource
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.step_dependency_config import (
    StepDependencyConfig,
    get_step_dependency_config_field,
)
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor
from dagster._utils.error import serializable_error_info_from_exc_info

from mp_pipelines.dagster_ext.celery import CELERY_EXECUTOR_CONFIG, celery_fleet_executor
from mp_pipelines.dagster_ext.forkserver import CurrentEnvironmentExecutor
from mp_pipelines.dagster_ext.step_threads import StepThread, StepThreads, StoredOutputs, is_terminal
from mp_pipelines.dagster_ext.traced import TracedExecutor

# Longest the orchestrating thread waits between checks for interrupts, due retries and free pool slots.
_POLL_SECONDS = 0.1

CONCURRENT_EXECUTOR_CONFIG: dict[str, Any] = {
    "max_concurrent": dg.Field(dg.Int, default_value=64, description="Most steps in flight at once in this run."),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),
    "retries": get_retries_config(),
    "step_dependency_config": get_step_dependency_config_field(),
}


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


def _close_run_logs(capture: ExitStack, job_context: PlanExecutionContext) -> Iterator[DagsterEvent]:
    """End the run's log capture once every step is done."""
    try:
        capture.close()
    except Exception:  # noqa: BLE001 - as in process
        yield _engine_error(job_context, "Exception while cleaning up compute log capture")


def _engine_error(job_context: PlanExecutionContext, message: str, **metadata: Any) -> DagsterEvent:
    error = serializable_error_info_from_exc_info(sys.exc_info())
    metadata = {key: dg.MetadataValue.text(str(value)) for key, value in metadata.items()}
    return DagsterEvent.engine_event(job_context, message, EngineEventData(metadata=metadata, error=error))


def _enter_active_execution(
    stack: ExitStack,
    job_context: PlanExecutionContext,
    execution_plan: ExecutionPlan,
    max_concurrent: int,
    tag_concurrency_limits: list[dict[str, Any]] | None,
) -> ActiveExecution:
    """Enter the run's pool-slot context and its ActiveExecution (Dagster's step bookkeeping) on `stack`."""
    pools = stack.enter_context(InstanceConcurrencyContext(job_context.instance, job_context.dagster_run))
    return stack.enter_context(ActiveExecution(
        execution_plan,
        retry_mode=job_context.retry_mode,
        max_concurrent=max_concurrent,
        tag_concurrency_limits=tag_concurrency_limits,
        instance_concurrency_context=pools,
        step_dependency_config=job_context.step_dependency_config,
    ))


def _orchestrate(
    job_context: PlanExecutionContext,
    execution_plan: ExecutionPlan,
    max_concurrent: int,
    tag_concurrency_limits: list[dict[str, Any]] | None,
) -> Iterator[DagsterEvent]:
    """Launch ready steps on threads; yield their events in arrival order and feed each to ActiveExecution."""
    with ExitStack() as stack:
        active = _enter_active_execution(stack, job_context, execution_plan, max_concurrent, tag_concurrency_limits)
        capture = stack.enter_context(ExitStack())
        yield from _capture_run_logs(capture, job_context, execution_plan)
        loop = _StepLoop(job_context, active, max_concurrent)
        try:
            yield from loop.run()
        except (KeyboardInterrupt, DagsterExecutionInterruptedError):
            yield from loop.report_interrupted()
            raise
        except Exception:
            yield from loop.report_failed()
            raise
        finally:
            loop.threads.abandon_alive()
        yield from _close_run_logs(capture, job_context)


class _StepLoop:
    """The orchestration loop of one run: launch ready steps, relay their threads' messages, until all end."""

    def __init__(self, job_context: PlanExecutionContext, active: ActiveExecution, max_concurrent: int) -> None:
        self.job_context = job_context
        self.active = active
        self.max_concurrent = max_concurrent
        self.threads = StepThreads()
        self.stored = StoredOutputs()

    def run(self) -> Iterator[DagsterEvent]:
        """Loop until the plan is complete and every step thread has ended, yielding events as they come."""
        active = self.active
        while not active.is_complete or self.threads.alive:
            # Dagster captures SIGINT (how run termination arrives) as a flag; the multiprocess loop polls it too.
            if active.check_for_interrupts():
                raise DagsterExecutionInterruptedError()
            yield from self._launch_ready_steps()
            yield from self._relay_messages()
            yield from active.plan_events_iterator(self.job_context)

    def _launch_ready_steps(self) -> Iterator[DagsterEvent]:
        """Start a thread for each step ActiveExecution releases, up to `max_concurrent` alive threads."""
        active = self.active
        steps = active.get_steps_to_execute(limit=max(0, self.max_concurrent - len(self.threads.alive)))
        yield from active.concurrency_event_iterator(self.job_context)
        known_state = active.get_known_state() if steps else None
        for step in steps:
            self.threads.launch(self.job_context.for_step(step, known_state))

    def _relay_messages(self) -> Iterator[DagsterEvent]:
        """Wait briefly for the threads' messages; yield each event and feed ActiveExecution in arrival order."""
        due = self.active.sleep_interval()  # a delayed retry or a pool re-check
        for worker, event, error in self.threads.messages(min(_POLL_SECONDS, due) if due > 0 else _POLL_SECONDS):
            if event is not None:
                yield event
                self._handle_event(worker, event)
            else:
                self._handle_thread_end(worker, error)

    def _handle_event(self, worker: StepThread, event: DagsterEvent) -> None:
        """Feed a step's event to ActiveExecution (outputs once stored) and settle the step when it ends."""
        for ready in self.stored.feed(event):
            self.active.handle_event(ready)
        if is_terminal(event):
            self.threads.settle(worker)

    def _handle_thread_end(self, worker: StepThread, error: BaseException | None) -> None:
        """Forget an ended thread; re-raise what escaped its step."""
        self.threads.alive.discard(worker)
        if self.threads.settle(worker):  # the thread ended without a success, failure or retry event
            self.active.verify_complete(self.job_context, worker.key)
        if error is not None:
            raise error  # as in process: an exception escaping a step ends the run

    def report_interrupted(self) -> Iterator[DagsterEvent]:
        """On termination (called while handling it): report the in-flight steps as interrupted."""
        self.active.mark_interrupted()
        yield DagsterEvent.engine_event(
            self.job_context,
            "Concurrent executor: received termination signal - reporting in-flight steps as interrupted;"
            " their threads cannot be stopped and are left to end as daemon threads",
            EngineEventData.interrupted(sorted(self.threads.in_flight)),
        )
        yield from self.threads.fail_in_flight(self.active, sys.exc_info(), ErrorSource.INTERRUPT)

    def report_failed(self) -> Iterator[DagsterEvent]:
        """On an unexpected error (called while handling it): report the in-flight steps as failed."""
        if self.threads.in_flight:
            # _engine_error reads the error being handled, sys.exc_info(), as the failures below do.
            yield _engine_error(self.job_context, "Unexpected exception while steps were still in progress -"
                                " reporting them as failed:", steps_interrupted=sorted(self.threads.in_flight))
            yield from self.threads.fail_in_flight(self.active, sys.exc_info(), ErrorSource.FRAMEWORK_ERROR)


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
    spread = "multiprocess" in config or "celery" in config
    return list(multiple_process_executor_requirements()) if spread else []


@dg.executor(
    name="selectable",
    config_schema=dg.Field(
        dg.Selector({"concurrent": dg.Field(CONCURRENT_EXECUTOR_CONFIG), "multiprocess": MULTI_PROC_CONFIG,
                     "in_process": IN_PROC_CONFIG,
                     "celery": dg.Field({**CELERY_EXECUTOR_CONFIG, "retries": get_retries_config()})}),
        default_value={"concurrent": {}},
    ),
    requirements=_selected_requirements,
)
def selectable_executor(init_context: dg.InitExecutorContext) -> Executor:
    """The concurrent executor, or Dagster's multiprocess (its forkserver's step processes in the current
    environment, see `forkserver.py`) or in-process one, or dagster-celery's on a worker fleet, chosen per run in
    run config."""
    ((kind, options),) = init_context.executor_config.items()
    if kind == "celery":
        return celery_fleet_executor(init_context, options)
    if kind == "concurrent":
        chosen, config = concurrent_executor, options
    else:
        chosen, config = dg.multi_or_in_process_executor, {kind: options}

    def make(config: dict[str, Any]) -> Executor:
        return chosen.executor_creation_fn(  # type: ignore[misc]
            dg.InitExecutorContext(job=init_context.job, executor_def=chosen, executor_config=config,
                                   instance=init_context.instance))

    if kind == "multiprocess" and "forkserver" in (options.get("start_method") or {}):
        spawning = {kind: {**options, "start_method": {"spawn": {}}}}
        return TracedExecutor(CurrentEnvironmentExecutor(make(config), lambda: make(spawning)))
    return TracedExecutor(make(config))
