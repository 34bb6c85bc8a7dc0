"""Stage: one fan-out never has more than its `breadth` calls in flight in this process."""

from __future__ import annotations

from mp_pipelines.calls.call import Answer, Call, Proceed


class Breadth:
    """A call of a fan-out waits for one of the fan-out's `breadth` slots (shared by all its shards)."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        scope = call.scope
        if scope.fanout is None or scope.breadth is None:
            return await proceed(call)
        async with scope.run.semaphore(("fanout", scope.fanout), scope.breadth):
            return await proceed(call)
