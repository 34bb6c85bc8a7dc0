"""The run's span around whichever executor a run chose, in the process that runs the run (the run worker).

With telemetry off (`telemetry.setup.active()` is None) the run's events pass through untouched. With it on, the
run span gets the ids derived from the run id, so step spans made in this process or any other are its children;
when the run's steps are done its spans and metrics are exported and pushed.
"""

import os
from collections.abc import Iterator
from typing import Any

from mp_pipelines.dagster_ext.compat import checked_overrides
from mp_pipelines.dagster_ext.delegating import DelegatingExecutor
from mp_pipelines.telemetry.names import FAILED_STEPS
from mp_pipelines.telemetry.setup import RUN_WORKER_PIDS, active, start_run_span


@checked_overrides
class TracedExecutor(DelegatingExecutor):
    """`inner`, its run inside the run's span."""

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        telemetry = active()
        if telemetry is None:
            yield from self._inner.execute(plan_context, execution_plan)
            return
        RUN_WORKER_PIDS.add(os.getpid())
        run = plan_context.dagster_run
        span = start_run_span(telemetry, run.run_id, run.job_name) if telemetry.tracer is not None else None
        failed_steps = 0
        try:
            for event in self._inner.execute(plan_context, execution_plan):
                failed_steps += event.event_type_value == "STEP_FAILURE"
                yield event
        finally:
            if span is not None:
                span.set_attribute(FAILED_STEPS, failed_steps)
                if failed_steps:
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, f"{failed_steps} step(s) failed"))
                span.end()
            telemetry.flush()
