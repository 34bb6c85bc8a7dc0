"""Stage: batch mode. A task's calls wait here until every item has its request, then go out as Batch API jobs.

Below the response cache (a stored answer is never submitted), identical-call sharing and repair, above breadth,
limits, budget and pricing, which a batch settles for itself (`batch_send.py`). Each call parks with the task's
`BatchCollector`; once every item still running has parked a request (or no request has parked for
`QUIET_SECONDS`: items waiting on a retry or on an identical call), the parked requests are sent as one batch per
file of at most MP_BATCH_MAX_LINES lines. Each answer then comes back up the path like an online one: JSON
validation, repair (a follow-up batch, or online with `batch_repair: online`), the cache, usage.

With `batch_fallback: online`, an endpoint without the Batch API makes the task's calls online instead.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.keys import checkpoint_key, request_key
from mp_pipelines.spec.models import BatchSettings

QUIET_SECONDS = 1.0  # flush what has parked when nothing new parked for this long
CLEANUP_SECONDS = 15.0  # most a cancelled task waits for its batches to be cancelled on the endpoint

log = logging.getLogger(__name__)


@dataclass
class Parked:
    """A call waiting for its batch."""

    call: Call
    proceed: Proceed  # the online path below, for a fallback
    future: asyncio.Future[Answer]
    custom_id: str  # the item's label: unique among the requests of one flush
    checkpoint: str  # what is asked, for this item: a resumed run finds its batch by it


class BatchCollector:
    """One step's batch-mode calls: how many items are still running, which have parked a request, and the batches
    in flight for them."""

    def __init__(self, settings: BatchSettings, logger: Any = None) -> None:
        self.settings = settings
        self.log = logger or log
        self.active = 0  # items of the step still running
        self.parked: list[Parked] = []
        self.submitted = 0  # parked calls whose batches are in flight
        self.online = False  # the endpoint has no Batch API and the task falls back to online calls
        self.first_turns: dict[str, int] = {}  # label -> messages of its first request (more: a repair)
        self._flushes: set[asyncio.Task[None]] = set()
        self._quiet: asyncio.TimerHandle | None = None

    # -- items --
    def expect(self, items: int) -> None:
        """`items` more items will send their calls through this collector."""
        self.active += items

    def item_done(self) -> None:
        """An item finished (answered, failed or skipped): the others need not wait for it."""
        self.active -= 1
        self._maybe_flush()

    # -- calls --
    def goes_online(self, call: Call) -> bool:
        """Whether this call skips the batch: a fallback is in force, or it is a repair and repairs go online."""
        if self.online:
            return True
        turns = self.first_turns.setdefault(call.request.label, len(call.request.messages))
        return self.settings.repair == "online" and len(call.request.messages) > turns

    async def submit(self, call: Call, proceed: Proceed) -> Answer:
        """Park the call until its batch answers."""
        key = call.key or request_key(call.request, call.model.endpoint_key())
        parked = Parked(call, proceed, asyncio.get_running_loop().create_future(), call.request.label,
                        checkpoint_key(key, call.request.label))
        self.parked.append(parked)
        self._maybe_flush()
        if self.parked and self._quiet is None:
            self._quiet = asyncio.get_running_loop().call_later(QUIET_SECONDS, self._flush_quietly)
        try:
            return await parked.future
        except asyncio.CancelledError:
            await self.abandon()
            raise

    def _maybe_flush(self) -> None:
        if self.parked and len(self.parked) + self.submitted >= self.active:
            self._flush()

    def _flush_quietly(self) -> None:
        self._quiet = None
        if self.parked:
            self._flush()

    def _flush(self) -> None:
        from mp_pipelines.calls.batch_send import send  # the sending half, loaded with the first batch

        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        parked, self.parked = self.parked, []
        self.submitted += len(parked)
        task = asyncio.get_running_loop().create_task(send(self, parked))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def answered(self, parked: Parked) -> None:
        """A submitted call has its outcome (set on its future by the sender)."""
        self.submitted -= 1

    async def abandon(self) -> None:
        """The step is being stopped: cancel the batches in flight (on the endpoint too) and wait for that."""
        flushes = [task for task in self._flushes if not task.done()]
        for task in flushes:
            task.cancel()
        if flushes:
            await asyncio.wait(flushes, timeout=CLEANUP_SECONDS)


class BatchSubmission:
    """In batch mode, the call waits for its batch; otherwise it goes on to the online stages."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        collector = call.scope.batch
        if collector is None or collector.goes_online(call):
            return await proceed(call)
        return await collector.submit(call, proceed)
