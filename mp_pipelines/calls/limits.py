"""Stage: limits on LLM calls — in-flight cap, requests and tokens per minute, adaptive after HTTP 429.

A `CallLimiter` guards one model at one scope (a process, or one run); every call of that scope
takes a slot first. Rates use `aiolimiter`'s leaky bucket. A 429 pauses new calls for its
Retry-After and halves the in-flight cap; a 5xx shrinks it by a quarter; each success gives one slot back (additive increase,
multiplicative decrease), so throughput recovers once the endpoint stops throttling or failing. The
retry stage (`retry.py`) sends the failed request again, through this limiter, honouring Retry-After.

When the steps of a run are spread over processes or machines, a limiter also holds a `FleetLimits`: the
same caps then hold across the fleet through shared storage (`fleet.py`; the stores on Redis or the
instance's database are in `fleet_stores.py`), and a 429 seen by one process pauses the model in all of them. Without
one, everything stays in this process's memory: the fast path for a run in one process.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from aiolimiter import AsyncLimiter

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.fleet import FleetLimits, fleet_key
from mp_pipelines.llm.headers import retry_after_seconds
from mp_pipelines.llm.types import LimitSettings, LLMRequest

DEFAULT_PAUSE_SECONDS = 1.0  # after a 429 without Retry-After
MAX_PAUSE_SECONDS = 60.0
# A 5xx shrinks the in-flight cap by this factor (a 429 halves it): at an error rate p the cap settles near
# (1 - p) / (p × (1 - factor)) calls, 16 at 20 % errors, 4 at 50 %, 1 when nearly all fail.
SERVER_ERROR_DECREASE = 0.75
_DEFAULT_COMPLETION_TOKENS = 256


def pause_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to pause new calls after a throttled response: its Retry-After, at most MAX_PAUSE_SECONDS."""
    wait = retry_after_seconds(headers)
    return None if wait is None else min(wait, MAX_PAUSE_SECONDS)


class CallLimiter:
    """Limits of one model at one scope; use `async with limiter.slot(tokens):` around a call."""

    def __init__(self, settings: LimitSettings, fleet: FleetLimits | None = None, fleet_key: str = "") -> None:
        self.settings = settings
        self.fleet = fleet  # the caps hold across the fleet too (see FleetLimits); None: this process only
        self.fleet_key = fleet_key
        self._cap = settings.max_in_flight
        self.allowed = settings.max_in_flight  # the adaptive cap, ≤ the configured one
        self.in_flight = 0
        self.peak_in_flight = 0
        self.throttled = 0  # 429s seen
        self.server_errors = 0  # 5xx seen
        self._paused_until = 0.0
        self._changed = asyncio.Condition()
        self._requests = per_minute_bucket(settings.requests_per_minute)
        self._tokens = per_minute_bucket(settings.tokens_per_minute)

    @asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[None]:
        """Wait for a pause to end, an in-flight slot and the rate budgets; release the slot after."""
        async with self._changed:
            while True:
                pause = self._paused_until - time.monotonic()
                if pause > 0:
                    await _wait(self._changed, pause)
                elif self.allowed is not None and self.in_flight >= self.allowed:
                    await self._changed.wait()
                else:
                    break
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.fleet is not None:
                async with AsyncExitStack() as fleet_slot:
                    if self._cap is not None:
                        await fleet_slot.enter_async_context(self.fleet.slot(f"{self.fleet_key}/in_flight", self._cap))
                    await self.fleet.wait_turn(self.fleet_key, self.settings, tokens)
                    yield
                return
            if self._requests is not None:
                await self._requests.acquire()
            if self._tokens is not None and tokens > 0:
                # one call can never take more than the whole bucket
                await self._tokens.acquire(min(tokens, self._tokens.max_rate))
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        """Adapt to one HTTP response of a call made in a slot (called on the loop's thread)."""
        if status == 429:
            self.throttled += 1
            wait = pause_after(headers)
            pause = DEFAULT_PAUSE_SECONDS if wait is None else wait
            self._paused_until = max(self._paused_until, time.monotonic() + pause)
            if self.fleet is not None:
                self.fleet.pause(self.fleet_key, pause)
            self.decrease(0.5)
        elif status >= 500:
            self.server_errors += 1
            # Error-rate aware (docs/reliability.md). Uncapped, from the most ever in flight: calls backing off
            # before a retry hold no slot, so what is in flight at a 5xx understates the traffic.
            self.decrease(SERVER_ERROR_DECREASE, self.peak_in_flight)
        elif status < 400 and self.allowed is not None:
            ceiling = self._cap if self._cap is not None else math.inf
            if self.allowed < ceiling:
                self.allowed += 1
                if self._cap is None and self.allowed > 4 * max(self.peak_in_flight, 1):
                    self.allowed = None  # fully recovered: uncapped again

    def decrease(self, factor: float, uncapped_from: int = 0) -> None:
        """Multiplicative decrease of the in-flight cap (uncapped: start from what is in flight, or
        `uncapped_from` when more)."""
        start = max(self.in_flight, uncapped_from)
        if self.allowed is not None:
            self.allowed = max(1, int(self.allowed * factor))
        elif start > 1:
            self.allowed = max(1, int(start * factor))


def per_minute_bucket(per_minute: float | None) -> AsyncLimiter | None:
    """A leaky bucket for a per-minute rate that refills every second or so, so bursts stay small.

    (A 60-second bucket would let a whole minute's budget out at once.)
    """
    if not per_minute:
        return None
    period = max(1.0, 60.0 / per_minute)  # at least one unit per period
    return AsyncLimiter(per_minute * period / 60.0, period)


async def _wait(condition: asyncio.Condition, seconds: float) -> None:
    try:
        await asyncio.wait_for(condition.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class LimiterRegistry:
    """Limiters and semaphores by key, created on first use; used only from the shared loop's thread."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[str, ...], CallLimiter] = {}
        self._semaphores: dict[tuple[str, ...], asyncio.Semaphore] = {}

    def limiter(self, key: tuple[str, ...], settings: LimitSettings, fleet: FleetLimits | None = None) -> CallLimiter:
        """The limiter of `key` (shared across the fleet through `fleet` when given); a new one when the settings
        or the fleet changed."""
        found = self._limiters.get(key)
        if found is None or found.settings != settings or found.fleet is not fleet:
            found = self._limiters[key] = CallLimiter(settings, fleet, fleet_key(*key) if fleet is not None else "")
        return found

    def semaphore(self, key: tuple[str, ...], size: int) -> asyncio.Semaphore:
        """A semaphore shared by every caller with `key` (e.g. all shards of one fan-out)."""
        found = self._semaphores.get(key)
        if found is None:
            found = self._semaphores[key] = asyncio.Semaphore(size)
        return found

    def __len__(self) -> int:
        return len(self._limiters) + len(self._semaphores)

    def clear(self) -> None:
        self._limiters.clear()
        self._semaphores.clear()


# The process's own caps, one limiter per endpoint and model (LLMResource max_in_flight, requests_per_minute,
# tokens_per_minute): they outlive runs, like the connection pool, and always exist so that a 429 slows every
# caller of the process down. A run's workflow `limits` are the run's own (`RunCalls`).
PROCESS_LIMITERS = LimiterRegistry()


def estimate_tokens(request: LLMRequest) -> int:
    """Tokens a call may use, for the tokens-per-minute limit: prompt ≈ chars/4, plus the completion cap."""
    prompt = sum(len(str(m.get("content", ""))) for m in request.messages) // 4 + 1
    return prompt + (request.max_tokens or _DEFAULT_COMPLETION_TOKENS)


class RateLimits:
    """A call takes a slot of the process's limiter for its model, and of the run's when the workflow has
    `limits`; both see the call's HTTP responses to adapt to 429s. With a fleet (`CallScope.fleet`) the
    process's limiter is the fleet's for the model and the run's holds across all the run's processes."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        model = call.request.model or call.model.default_model
        endpoint = call.model.endpoint_key()
        fleet = call.scope.fleet
        limiters = [PROCESS_LIMITERS.limiter((endpoint, model), call.model.limit_settings(), fleet)]
        run_limits = call.scope.run_limits
        if run_limits is not None and not run_limits.unlimited:
            limiters.append(call.scope.run.limiter((call.scope.run_id, endpoint, model), run_limits, fleet))
        tokens = estimate_tokens(call.request)
        async with AsyncExitStack() as stack:
            for limiter in limiters:
                await stack.enter_async_context(limiter.slot(tokens))
            return await proceed(call.observed_by(*(limiter.observe for limiter in limiters)))
