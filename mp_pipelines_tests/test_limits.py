"""Shared call limits: in-flight caps, per-minute rates, the adaptive pause after HTTP 429 (pure asyncio)."""

from __future__ import annotations

import asyncio
import time

import pytest

from mp_pipelines.calls.limits import CallLimiter, LimiterRegistry, pause_after
from mp_pipelines.calls.run import RunCalls
from mp_pipelines.llm.types import LimitSettings
from mp_pipelines.spec.models import BudgetSpec


async def _hold(limiter: CallLimiter, seconds: float) -> None:
    async with limiter.slot():
        await asyncio.sleep(seconds)


def test_in_flight_cap_is_never_exceeded() -> None:
    limiter = CallLimiter(LimitSettings(max_in_flight=3))

    async def main() -> None:
        await asyncio.gather(*(_hold(limiter, 0.02) for _ in range(20)))

    asyncio.run(main())
    assert limiter.peak_in_flight == 3
    assert limiter.in_flight == 0


def test_requests_per_minute_spreads_calls() -> None:
    limiter = CallLimiter(LimitSettings(requests_per_minute=1200))  # 20 a second

    async def main() -> float:
        started = time.monotonic()
        await asyncio.gather(*(_hold(limiter, 0) for _ in range(40)))
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert elapsed >= 0.9  # 20 at once, then 20 more at 20/s: a minute's budget never leaves at once


def test_tokens_per_minute_waits_for_budget() -> None:
    limiter = CallLimiter(LimitSettings(tokens_per_minute=6000))  # 100 tokens a second

    async def main() -> float:
        started = time.monotonic()
        for _ in range(3):
            async with limiter.slot(tokens=100):
                pass
        return time.monotonic() - started

    assert asyncio.run(main()) >= 1.5


def test_429_pauses_new_calls_for_retry_after_and_halves_the_cap_then_recovers() -> None:
    limiter = CallLimiter(LimitSettings(max_in_flight=8))

    async def main() -> float:
        limiter.observe(429, {"retry-after": "0.4"})
        started = time.monotonic()
        async with limiter.slot():
            pass
        return time.monotonic() - started

    waited = asyncio.run(main())
    assert waited >= 0.35
    assert limiter.allowed == 4 and limiter.throttled == 1
    for _ in range(10):
        limiter.observe(200, {})
    assert limiter.allowed == 8  # back to the configured cap, never above


def test_429_without_a_cap_starts_adapting_from_what_was_in_flight() -> None:
    limiter = CallLimiter(LimitSettings())
    limiter.in_flight = 10
    limiter.observe(429, {"retry-after-ms": "1"})
    assert limiter.allowed == 5


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "2"}, 2.0), ({"retry-after-ms": "250"}, 0.25), ({"retry-after": "soon"}, None),
    ({}, None), ({"retry-after": "99999"}, 60.0),
])
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert pause_after(headers) == expected


def test_registry_shares_limiters_and_semaphores_by_key() -> None:
    registry = LimiterRegistry()
    settings = LimitSettings(max_in_flight=2)
    assert registry.limiter(("process", "m"), settings) is registry.limiter(("process", "m"), settings)
    assert registry.limiter(("process", "m"), settings) is not registry.limiter(("process", "n"), settings)

    async def main() -> None:
        first = registry.semaphore(("fanout", "run1", "t"), 2)
        assert registry.semaphore(("fanout", "run1", "t"), 2) is first

    asyncio.run(main())
    registry.clear()
    assert registry._semaphores == {} and len(registry) == 0


def test_run_state_is_the_runs_own_and_empty_once_closed() -> None:
    """Two runs in one process never share a fan-out semaphore or limiter, and a closed run holds nothing."""
    first, second = RunCalls("run1"), RunCalls("run2")

    async def main() -> None:
        assert first.semaphore(("fanout", "t"), 2) is first.semaphore(("fanout", "t"), 2)
        assert first.semaphore(("fanout", "t"), 2) is not second.semaphore(("fanout", "t"), 2)
        assert first.limiter(("e", "m"), LimitSettings(max_in_flight=1)) is not second.limiter(("e", "m"),
                                                                                                LimitSettings(1))
        first.budget(BudgetSpec(max_calls=3), None)

    asyncio.run(main())
    assert first.entries == 3
    first.close()
    assert first.entries == 0 and second.entries == 2


def test_settings_merge_prefers_the_workflow_values() -> None:
    resource = LimitSettings(max_in_flight=64, requests_per_minute=500)
    workflow = LimitSettings(max_in_flight=4)
    assert resource.merged(workflow) == LimitSettings(4, 500, None)
    assert LimitSettings().unlimited and not workflow.unlimited
