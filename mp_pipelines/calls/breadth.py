"""Stage: one fan-out never has more than its `breadth` calls in flight, in this process or across the fleet."""

from __future__ import annotations

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.fleet import fleet_key


class Breadth:
    """A call of a fan-out waits for one of the fan-out's `breadth` slots (shared by all its shards): in this
    process, and with a fleet (`CallScope.fleet`) also one of the `breadth` slots of all the run's processes."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        scope = call.scope
        if scope.fanout is None or scope.breadth is None:
            return await proceed(call)
        async with scope.run.semaphore(("fanout", scope.fanout), scope.breadth):
            if scope.fleet is None:
                return await proceed(call)
            async with scope.fleet.slot(fleet_key("breadth", scope.run_id, scope.fanout), scope.breadth):
                return await proceed(call)
