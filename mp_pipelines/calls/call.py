"""A model call on its way through the call path (`path.py`), and the answer that comes back.

A stage is an object with `async __call__(call, proceed) -> Answer`: it may answer by itself (a cache hit),
change the call before passing it on (`proceed(call)`), wait before it, or look at what comes back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import ChatModel, LimitSettings, LLMRequest, LLMResult, ResponseObserver
from mp_pipelines.spec.models import BudgetSpec

if TYPE_CHECKING:
    from mp_pipelines.calls.batch import BatchCollector
    from mp_pipelines.calls.fleet import FleetLimits
    from mp_pipelines.calls.models import ModelRouter
    from mp_pipelines.calls.retry import RetryBudget
    from mp_pipelines.calls.run import RunCalls
    from mp_pipelines.calls.store import ResponseStore


@dataclass(frozen=True)
class CallScope:
    """Where a call belongs: its run, the run's limits and budget, its fan-out, its task and its cache."""

    run: RunCalls  # the run's call-path state in this process
    run_limits: LimitSettings | None = None  # the workflow's `limits` (over the resource's defaults)
    fanout: str | None = None  # task name of the fan-out the call is part of
    breadth: int | None = None  # most calls of that fan-out in flight at once (across the fleet with `fleet`)
    budget: BudgetSpec | None = None  # the run's budget (workflow `budget:` or run config)
    store: ResponseStore | None = None  # the instance's response store (cache and checkpoints)
    cache_policy: str = "off"  # read_write | read | write | off, for this task
    root_run_id: str = ""  # the run family: a re-executed run reads its family's checkpoint
    resuming: bool = False  # this run re-executes an earlier one, or this step retries (reads the checkpoint)
    step_retry: bool = False  # this step is a retry within its run: its checkpointed answers were paid for here
    workflow: str = ""
    task: str = ""
    repair_attempts: int = 0  # times an answer that is not the JSON asked for is sent back
    task_timeout: float | None = None  # the task's `timeout` in seconds, for messages
    retry_budget: RetryBudget | None = None  # the task's `retries:` as a budget (None: DEFAULT_RETRY, calls/retry.py)
    fallback: tuple[str, ...] = ()  # models that answer when this one fails after its retries (calls/fallback.py)
    router: ModelRouter | None = None  # `model` / `provider/model` → the endpoint's ChatModel and model id
    log: Any = None  # where retries and pauses are said as they happen (the op's log); None: Python logging
    fleet: FleetLimits | None = None  # limits shared by the run's processes (steps spread over processes)
    batch: BatchCollector | None = None  # in batch mode: where the step's calls wait for their batches

    @property
    def run_id(self) -> str:
        return self.run.run_id


@dataclass(frozen=True)
class Call:
    """One request of a task, with everything the stages need to decide about it."""

    model: ChatModel
    request: LLMRequest
    scope: CallScope
    key: str = ""  # the request's content address (calls.store.request_key), "" when nothing stores or shares it
    deadline: float | None = None  # time.monotonic() by which the task must have its answer
    observers: tuple[ResponseObserver, ...] = field(default=())  # see every HTTP response of the call

    def observed_by(self, *observers: ResponseObserver) -> Call:
        """The same call, its HTTP responses also shown to `observers` (built directly: this is per call)."""
        return Call(self.model, self.request, self.scope, self.key, self.deadline, (*self.observers, *observers))


@dataclass(frozen=True)
class Answer:
    """A usable answer and everything it took to get it (a repaired answer counts every call)."""

    result: LLMResult
    usage: Usage
    model: str = ""  # the model (`model` or `provider/model`) that answered, when a fallback did


Proceed = Callable[[Call], Awaitable[Answer]]


class Stage(Protocol):
    """One concern of the call path; `proceed` passes the call to the stages after it."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer: ...
