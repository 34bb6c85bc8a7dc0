"""The one path every model call takes: its stages, read top to bottom in the order they act.

A task's request enters at the top; each stage may answer it, hold it back, or pass it on; the last
one asks the model. Adding a concern (telemetry, batch submission, a fallback model) is one module
with one `Stage` class and one line in `STAGES`. Calls run on the process's shared event loop
(`loop.shared_loop()`), so every stage's waiting happens there and costs no thread.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from mp_pipelines.calls.batch import BatchSubmission
from mp_pipelines.calls.breadth import Breadth
from mp_pipelines.calls.budget import BudgetAdmission
from mp_pipelines.calls.cache import ResponseCache
from mp_pipelines.calls.call import Answer, Call, CallScope, Proceed, Stage
from mp_pipelines.calls.deadline import Deadline
from mp_pipelines.calls.fallback import Fallback
from mp_pipelines.calls.identical import IdenticalCalls
from mp_pipelines.calls.keys import request_key
from mp_pipelines.calls.limits import RateLimits
from mp_pipelines.calls.model import ModelCall
from mp_pipelines.calls.pricing import Pricing
from mp_pipelines.calls.repair import Repair
from mp_pipelines.calls.retry import Retries
from mp_pipelines.calls.telemetry import CallTelemetry
from mp_pipelines.llm.types import ChatModel, LLMRequest

STAGES: tuple[Stage, ...] = (
    Fallback(),  # a model that still fails after its retries (or whose circuit is open) hands the call to the next
    CallTelemetry(),  # a span, metrics and the step's tally for every call (each model tried), cache hits included
    ResponseCache(),  # a stored answer (run family's checkpoint, shared cache) ends the call; new answers are kept
    IdenticalCalls(),  # an identical request in flight answers this one too
    Deadline(),  # the task's timeout bounds everything below
    Repair(),  # an answer that is not the JSON asked for goes back to the model with what is wrong
    BatchSubmission(),  # batch mode: the call waits for its Batch API job (which settles budget and price itself)
    Breadth(),  # the fan-out's calls in flight
    Retries(),  # retryable failures are sent again, with back-off, within the retry budget; the endpoint's circuit
    RateLimits(),  # the process's and the run's limits for the model, adaptive after HTTP 429
    BudgetAdmission(),  # the run's budget admits the call, and is charged for it
    Pricing(),  # usage and cost of what came back
    ModelCall(),  # the endpoint
)


async def _no_answer(call: Call) -> Answer:
    raise AssertionError("the call path's last stage must answer")


class CallPath:
    """Stages chained so that each one's `proceed` is the next one."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        proceed: Proceed = _no_answer
        for stage in reversed(self.stages):
            proceed = functools.partial(stage, proceed=proceed)
        self._first = proceed

    async def __call__(self, call: Call) -> Answer:
        return await self._first(call)


CALL_PATH = CallPath(STAGES)


async def answer(model: ChatModel, request: LLMRequest, scope: CallScope, *, deadline: float | None = None) -> Answer:
    """The answer to one task request, through every stage of the call path."""
    stored_or_shared = scope.store is not None or scope.cache_policy == "read_write"
    key = request_key(request, model.endpoint_key()) if stored_or_shared else ""
    return await CALL_PATH(Call(model, request, scope, key=key, deadline=deadline))
