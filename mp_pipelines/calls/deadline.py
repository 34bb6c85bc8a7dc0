"""Stage: a task's `timeout` bounds getting its answer from the model: waits for a slot, retries and repairs.

A task whose deadline has passed makes no call at all (`remaining_time`, checked when its request is built);
a stored answer or an identical call's answer costs no time worth bounding.
"""

from __future__ import annotations

import asyncio
import time

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.llm.types import LLMError


class TaskTimeout(RuntimeError):
    """A task used up its `timeout` before its model call could finish."""


def remaining_time(deadline: float | None, label: str) -> float | None:
    """Seconds left before `deadline` (a time.monotonic() value); TaskTimeout when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TaskTimeout(f"task {label} used up its timeout before calling the model")
    return left


class Deadline:
    """Nothing below outlives the task's deadline; running out of time is a TaskTimeout, not a model error."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        label, limit = call.request.label, call.scope.task_timeout
        left = remaining_time(call.deadline, label)
        try:
            if left is None:
                return await proceed(call)
            return await asyncio.wait_for(proceed(call), left)
        except asyncio.TimeoutError:
            raise TaskTimeout(f"task {label} exceeded its timeout of {limit:g} s waiting for the model") from None
        except LLMError as exc:
            if exc.kind == "timeout" and call.deadline is not None and time.monotonic() >= call.deadline:
                raise TaskTimeout(f"task {label} exceeded its timeout of {limit:g} s: {exc}") from None
            raise
