"""Limits shared by every process of a fleet, seen from the call path: `SharedLimits` is what a limiter needs of
shared storage (its stores, on Redis and on the instance's database, are in `fleet_stores.py`) and `FleetLimits`
drives one from the shared event loop.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from mp_pipelines.llm.types import LimitSettings

log = logging.getLogger(__name__)


def fleet_key(*parts: str) -> str:
    """A short key for one limited thing (e.g. endpoint and model), the same in every process."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


T = TypeVar("T")


class SharedLimits(Protocol):
    """What a limiter needs of storage shared by every process of a fleet (blocking calls; see `fleet.py`)."""

    def reserve(self, key: str, request_cost: float, token_cost: float) -> float:
        """Book the next turn of `key`'s rates, costing `request_cost` + `token_cost` seconds of them, never before
        its pause ends; the seconds until that turn (≤ 0: now)."""
        ...

    def pause(self, key: str, seconds: float) -> None:
        """No turn of `key` for the next `seconds` (a later pause already set stays)."""
        ...

    def paused_for(self, key: str) -> float:
        """Seconds `key` is still paused (0: not paused)."""
        ...

    def enter(self, key: str, limit: int, holder: str, lease: float) -> bool:
        """Take one of `key`'s `limit` slots for `holder` for `lease` seconds; False when all are taken."""
        ...

    def leave(self, key: str, holder: str) -> None:
        """Give `holder`'s slot of `key` back."""
        ...

    def renew(self, held: list[tuple[str, str]], lease: float) -> None:
        """Extend the leases of the (key, holder) slots this process holds by `lease` seconds from now."""
        ...


class FleetLimits:
    """A `SharedLimits` store seen from the shared event loop: its blocking calls run on a few threads of their
    own, the slots this process holds are renewed while it lives (a killed process frees them within a lease)."""

    LEASE_SECONDS = 10.0  # a slot of a process that died is free again after this; renewed every third of it
    _POLL_START, _POLL_MAX = 0.01, 0.2  # seconds between tries for a full in-flight slot set

    def __init__(self, shared: SharedLimits) -> None:
        self.shared = shared
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mp-fleet-limits")
        self._token = uuid.uuid4().hex[:16]
        self._numbers = itertools.count()
        self._held: dict[str, str] = {}  # holder → key, of the slots this process holds
        self._waiting: dict[str, collections.deque[asyncio.Future[str]]] = {}  # key → calls waiting for a slot
        self._renewing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"FleetLimits({self.shared!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def wait_turn(self, key: str, settings: LimitSettings, tokens: int) -> None:
        """Wait for `key`'s next turn under the fleet's request and token rates and its pause."""
        request_cost = 60.0 / settings.requests_per_minute if settings.requests_per_minute else 0.0
        token_cost = 60.0 * tokens / settings.tokens_per_minute if settings.tokens_per_minute and tokens else 0.0
        while not request_cost and not token_cost:  # no rate to book: only a pause holds the call back (a read)
            paused = await self._run(self.shared.paused_for, key)
            if paused <= 0:
                return
            await asyncio.sleep(paused)
        while True:
            wait = await self._run(self.shared.reserve, key, request_cost, token_cost)
            if wait <= 0:
                return
            await asyncio.sleep(wait)
            paused = await self._run(self.shared.paused_for, key)  # a pause may have begun while this turn waited
            if paused <= 0:
                return
            await asyncio.sleep(paused)

    @asynccontextmanager
    async def slot(self, key: str, limit: int) -> AsyncIterator[None]:
        """Hold one of `key`'s `limit` slots across the fleet while inside.

        A slot this process gives back goes straight to a call of this process waiting for the same key, without
        a round trip; waiting calls also try the store now and then, for slots other processes give back."""
        holder = await self._take(key, limit)
        self._keep_renewing()
        try:
            yield
        finally:
            self._give(key, holder)

    async def _take(self, key: str, limit: int) -> str:
        waiting = self._waiting.setdefault(key, collections.deque())
        delay = self._POLL_START
        while True:
            holder = f"{self._token}:{next(self._numbers)}"
            if await self._run(self.shared.enter, key, limit, holder, self.LEASE_SECONDS):
                self._held[holder] = key
                return holder
            handed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            waiting.append(handed)
            try:
                return await asyncio.wait_for(handed, delay * (0.5 + random.random()))
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                if handed.done() and not handed.cancelled():
                    self._give(key, handed.result())  # handed over just as this call was cancelled
                raise
            finally:
                if handed in waiting:
                    waiting.remove(handed)
            delay = min(delay * 1.5, self._POLL_MAX)

    def _give(self, key: str, holder: str) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            handed = waiting.popleft()
            if not handed.done():
                handed.set_result(holder)  # the lease (and its renewal) passes to that call
                return
        del self._held[holder]
        # given back on the store's threads without waiting: a cancelled call must not keep its slot
        self._threads.submit(self._leave, key, holder)

    def pause(self, key: str, seconds: float) -> None:
        """Pause `key` in every process (sent from a thread: `observe` must not block the loop)."""
        self._threads.submit(self._quietly, self.shared.pause, key, seconds)

    def _leave(self, key: str, holder: str) -> None:
        self._quietly(self.shared.leave, key, holder)

    @staticmethod
    def _quietly(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a lost update only delays others (leases expire); log it
            log.warning("shared limits: %s failed: %s", getattr(fn, "__name__", fn), exc)

    def _keep_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(self.LEASE_SECONDS / 3)
            held = [(key, holder) for holder, key in self._held.items()]
            try:
                await self._run(self.shared.renew, held, self.LEASE_SECONDS)
            except Exception as exc:  # noqa: BLE001 - tried again next round
                log.warning("shared limits: renewing %d slot(s) failed: %s", len(held), exc)
