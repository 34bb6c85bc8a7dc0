"""Every model call of a run goes through here: breadth semaphore, per-model limiters, the async client.

Calls run on the process's shared event loop (`aio.shared_loop()`), so limiters and semaphores are
shared by all shards and steps of the process; the limiter registry is only touched on that loop.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Mapping

from mp_pipelines.execution.client import LLMRequest, LLMResult
from mp_pipelines.execution.limits import LimiterRegistry, LimitSettings

REGISTRY = LimiterRegistry()  # process-wide, used only from the shared loop's thread
_DEFAULT_COMPLETION_TOKENS = 256


@dataclass(frozen=True)
class CallScope:
    """Where a call belongs: its run, the run's workflow limits and, in a fan-out, the fan-out's breadth."""

    run_id: str
    run_limits: LimitSettings | None = None  # the workflow's `limits` (over the resource's defaults)
    fanout: str | None = None  # task name of the fan-out the call is part of
    breadth: int | None = None  # most calls of that fan-out in flight at once, in this process


def estimate_tokens(request: LLMRequest) -> int:
    """Tokens a call may use, for the tokens-per-minute budget: prompt ≈ chars/4, plus the completion cap."""
    prompt = sum(len(str(m.get("content", ""))) for m in request.messages) // 4 + 1
    return prompt + (request.max_tokens or _DEFAULT_COMPLETION_TOKENS)


async def acall(llm: Any, request: LLMRequest, scope: CallScope) -> LLMResult:
    """One call under the fan-out's breadth, the process's and the run's limits for its model."""
    model = request.model or llm.default_model
    endpoint = llm.endpoint_key()
    # The process limiter always exists, even uncapped, so that a 429 slows every caller down.
    limiters = [REGISTRY.limiter(("process", endpoint, model), llm.limit_settings())]
    if scope.run_limits is not None and not scope.run_limits.unlimited:
        limiters.append(REGISTRY.limiter(("run", scope.run_id, endpoint, model), scope.run_limits))
    tokens = estimate_tokens(request)

    def observe(status: int, headers: Mapping[str, str]) -> None:
        for limiter in limiters:
            limiter.observe(status, headers)

    async with AsyncExitStack() as stack:
        if scope.fanout is not None and scope.breadth is not None:
            await stack.enter_async_context(REGISTRY.semaphore(("fanout", scope.run_id, scope.fanout), scope.breadth))
        for limiter in limiters:
            await stack.enter_async_context(limiter.slot(tokens))
        return await llm.acomplete(request, on_response=observe)
