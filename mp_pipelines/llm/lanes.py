"""One event loop's OpenAI clients ("lanes"), each with its own connection pool.

A call takes the least busy lane; another lane opens only when every lane has `LANE_CALLS` calls in
flight. The HTTP pool scans all its connections and probes each idle socket twice per request, so one
pool of 200 connections cost ~1.5 ms of CPU per call here, lanes of 16 a third of that
(docs/performance.md).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import openai

LANE_CALLS = 16  # calls in flight per lane before another lane (client and connection pool) opens
MAX_LANES = 32


class Lanes:
    """One event loop's clients, each with its own connection pool; a call takes the least busy one."""

    def __init__(self, make: Callable[[], openai.AsyncOpenAI]) -> None:
        self._make = make
        self.clients: list[openai.AsyncOpenAI] = []
        self.busy: list[int] = []  # calls in flight per lane

    def take(self) -> int:
        """A lane for one call (give it back with `release`); opens a lane when all are busy enough."""
        busy = self.busy
        lane = min(range(len(busy)), key=busy.__getitem__) if busy else -1
        if lane < 0 or (busy[lane] >= LANE_CALLS and len(busy) < MAX_LANES):
            self.clients.append(self._make())
            busy.append(0)
            lane = len(busy) - 1
        busy[lane] += 1
        return lane

    def release(self, lane: int) -> None:
        self.busy[lane] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()


async def close_with_loop(lanes: Lanes) -> AsyncGenerator[None, None]:
    """Parked async generator: the loop's shutdown_asyncgens() closes the clients before the loop closes."""
    try:
        yield
    finally:
        await lanes.aclose()
