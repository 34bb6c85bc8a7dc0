"""Shared limits on LLM calls: in-flight cap, requests and tokens per minute, adaptive after HTTP 429.

A `CallLimiter` guards one model at one scope (a process, or one run); every call of that scope
takes a slot first. Rates use `aiolimiter`'s leaky bucket. A 429 pauses new calls for its
Retry-After and halves the in-flight cap; each success gives one slot back (additive increase,
multiplicative decrease), so throughput recovers once the endpoint stops throttling. The openai
client itself retries the throttled request, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

DEFAULT_PAUSE_SECONDS = 1.0  # after a 429 without Retry-After
MAX_PAUSE_SECONDS = 60.0


@dataclass(frozen=True)
class LimitSettings:
    """Caps for one model; None means no cap."""

    max_in_flight: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def merged(self, other: LimitSettings | None) -> LimitSettings:
        """Field-wise: `other`'s values where set, else ours."""
        if other is None:
            return self
        return LimitSettings(*(o if o is not None else s for s, o in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int | float | None, ...]:
        return (self.max_in_flight, self.requests_per_minute, self.tokens_per_minute)

    @property
    def unlimited(self) -> bool:
        return all(value is None for value in self.astuple())


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds a throttled response asks to wait (`retry-after-ms` or `retry-after` in seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(max(float(value) * scale, 0.0), MAX_PAUSE_SECONDS)
        except ValueError:
            return None
    return None


class CallLimiter:
    """Limits of one model at one scope; use `async with limiter.slot(tokens):` around a call."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._cap = settings.max_in_flight
        self.allowed = settings.max_in_flight  # the adaptive cap, ≤ the configured one
        self.in_flight = 0
        self.peak_in_flight = 0
        self.throttled = 0  # 429s seen
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
            wait = retry_after_seconds(headers)
            self._paused_until = max(self._paused_until, time.monotonic() + (DEFAULT_PAUSE_SECONDS if wait is None else wait))
            if self.allowed is not None:
                self.allowed = max(1, self.allowed // 2)
            elif self.in_flight > 1:
                self.allowed = max(1, self.in_flight // 2)  # uncapped: start adapting from what was in flight
        elif status < 400 and self.allowed is not None:
            ceiling = self._cap if self._cap is not None else math.inf
            if self.allowed < ceiling:
                self.allowed += 1
                if self._cap is None and self.allowed > 4 * max(self.peak_in_flight, 1):
                    self.allowed = None  # fully recovered: uncapped again


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
    """Limiters by key, created on first use; lives on the process's shared event loop."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[str, ...], CallLimiter] = {}
        self._semaphores: dict[tuple[str, ...], asyncio.Semaphore] = {}
        self._budgets: dict[tuple[str, ...], Any] = {}

    def budget(self, run_id: str, budget: Any, store: Any) -> Any:
        """The run's BudgetTracker in this process (its account is in `store` when there is one)."""
        from mp_pipelines.calls.budget import BudgetTracker

        key = ("budget", run_id)
        found = self._budgets.get(key)
        if found is None or found.budget != budget or found.store is not store:
            found = self._budgets[key] = BudgetTracker(run_id, budget, store)
        return found

    def limiter(self, key: tuple[str, ...], settings: LimitSettings) -> CallLimiter:
        found = self._limiters.get(key)
        if found is None or found.settings != settings:
            found = self._limiters[key] = CallLimiter(settings)
        return found

    def semaphore(self, key: tuple[str, ...], size: int) -> asyncio.Semaphore:
        """A semaphore shared by every caller with `key` (e.g. all shards of one fan-out in one run)."""
        found = self._semaphores.get(key)
        if found is None:
            found = self._semaphores[key] = asyncio.Semaphore(size)
        return found

    def forget(self, prefix: tuple[str, ...]) -> None:
        """Drop the limiters and semaphores whose key starts with `prefix` (e.g. a finished run)."""
        for table in (self._limiters, self._semaphores, self._budgets):
            for key in [k for k in table if k[: len(prefix)] == prefix]:
                del table[key]
