"""The call path's state of one run in one process, owned by the run's resources.

Created when a run's resources are set up (`factory.resources.RunBudget`) and closed when they are torn
down, so a long-lived process (a run worker, the test suite, a CLI loop) keeps nothing of runs that ended.
Everything here is used on the shared event loop's thread only.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mp_pipelines.calls.budget import BudgetTracker
from mp_pipelines.calls.fleet import FleetLimits
from mp_pipelines.calls.limits import CallLimiter, LimiterRegistry
from mp_pipelines.llm.types import LimitSettings, LLMResult
from mp_pipelines.spec.models import BudgetSpec

if TYPE_CHECKING:
    from mp_pipelines.calls.store import ResponseStore


class RunCalls:
    """One run's limiters (its workflow `limits`), fan-out semaphores, budget account and identical calls in flight."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._limiters = LimiterRegistry()
        self._budget: BudgetTracker | None = None
        self.identical: dict[str, asyncio.Future[LLMResult]] = {}  # request key → the call answering it

    def __repr__(self) -> str:
        return f"RunCalls({self.run_id!r}, {self.entries} entries)"

    def limiter(self, key: tuple[str, ...], settings: LimitSettings, fleet: FleetLimits | None = None) -> CallLimiter:
        """The run's limiter of one endpoint and model (across the run's processes through `fleet` when given)."""
        return self._limiters.limiter(key, settings, fleet)

    def semaphore(self, key: tuple[str, ...], size: int) -> asyncio.Semaphore:
        """A semaphore shared by the run's callers with `key` (e.g. every shard of one fan-out)."""
        return self._limiters.semaphore(key, size)

    def budget(self, budget: BudgetSpec, store: ResponseStore | None) -> BudgetTracker:
        """The run's account against `budget` (in `store`'s database when there is one)."""
        if self._budget is None or self._budget.budget != budget or self._budget.store is not store:
            self._budget = BudgetTracker(self.run_id, budget, store)
        return self._budget

    @property
    def entries(self) -> int:
        """How many limiters, semaphores, accounts and identical calls the run holds."""
        return len(self._limiters) + len(self.identical) + (self._budget is not None)

    def close(self) -> None:
        """Forget everything (the run's resources are torn down: no call of the run is in flight)."""
        self._limiters.clear()
        self.identical.clear()
        self._budget = None
