"""Every model call of a run goes through here: budget, breadth semaphore, per-model limiters, the async client.

Calls run on the process's shared event loop (`aio.shared_loop()`), so limiters, semaphores and run
budgets are shared by all shards and steps of the process; the registry is only touched on that loop.
Each answer is priced here (`pricing.py`) and settled against the run's budget, invalid answers too.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any, Mapping

from mp_pipelines.calls.store import ResponseStore
from mp_pipelines.llm.client import LLMError, LLMRequest, LLMResult
from mp_pipelines.calls.limits import LimiterRegistry, LimitSettings
from mp_pipelines.calls.pricing import current_prices
from mp_pipelines.calls.usage import Usage
from mp_pipelines.spec.models import BudgetSpec

REGISTRY = LimiterRegistry()  # process-wide, used only from the shared loop's thread
_DEFAULT_COMPLETION_TOKENS = 256


@dataclass(frozen=True)
class CallScope:
    """Where a call belongs: its run, the run's limits and budget, its fan-out, and its cache."""

    run_id: str
    run_limits: LimitSettings | None = None  # the workflow's `limits` (over the resource's defaults)
    fanout: str | None = None  # task name of the fan-out the call is part of
    breadth: int | None = None  # most calls of that fan-out in flight at once, in this process
    budget: BudgetSpec | None = None  # the run's budget (workflow `budget:` or run config)
    store: ResponseStore | None = None  # the instance's response store (cache and checkpoints)
    cache_policy: str = "off"  # read_write | read | write | off, for this task
    root_run_id: str = ""  # the run family: a re-executed run reads its family's checkpoint
    resuming: bool = False  # this run re-executes an earlier one
    workflow: str = ""
    task: str = ""


def estimate_tokens(request: LLMRequest) -> int:
    """Tokens a call may use, for the tokens-per-minute budget: prompt ≈ chars/4, plus the completion cap."""
    prompt = sum(len(str(m.get("content", ""))) for m in request.messages) // 4 + 1
    return prompt + (request.max_tokens or _DEFAULT_COMPLETION_TOKENS)


def priced(result: LLMResult) -> LLMResult:
    """The result with its cost from the price table."""
    return replace(result, cost_usd=current_prices().cost(result.model, result.prompt_tokens, result.completion_tokens))


async def acall(llm: Any, request: LLMRequest, scope: CallScope) -> LLMResult:
    """One call under the run's budget, the fan-out's breadth, and the process's and run's limits for its model."""
    model = request.model or llm.default_model
    endpoint = llm.endpoint_key()
    # The process limiter always exists, even uncapped, so that a 429 slows every caller down.
    limiters = [REGISTRY.limiter(("process", endpoint, model), llm.limit_settings())]
    if scope.run_limits is not None and not scope.run_limits.unlimited:
        limiters.append(REGISTRY.limiter(("run", scope.run_id, endpoint, model), scope.run_limits))
    budget = None
    if scope.budget is not None and not scope.budget.unlimited:
        budget = REGISTRY.budget(scope.run_id, scope.budget, scope.store)
    tokens = estimate_tokens(request)

    def observe(status: int, headers: Mapping[str, str]) -> None:
        for limiter in limiters:
            limiter.observe(status, headers)

    async with AsyncExitStack() as stack:
        if scope.fanout is not None and scope.breadth is not None:
            await stack.enter_async_context(REGISTRY.semaphore(("fanout", scope.run_id, scope.fanout), scope.breadth))
        for limiter in limiters:
            await stack.enter_async_context(limiter.slot(tokens))
        if budget is not None:
            await budget.admit(request.label)  # checked after the wait for a slot: queued calls stop too
        try:
            result = priced(await llm.acomplete(request, on_response=observe))
        except LLMError as exc:
            if exc.result is not None:  # an answer that was unusable still cost its tokens
                exc.result = priced(exc.result)
            if budget is not None:
                await budget.settle(Usage.of_result(exc.result) if exc.result is not None else Usage())
            raise
        if budget is not None:
            await budget.settle(Usage.of_result(result))
        return result
