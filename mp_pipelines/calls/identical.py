"""Stage: identical requests in flight are paid once.

Under cache policy `read_write`, a request identical to one already in flight in the same run (the same item
twice in a fan-out) waits for that call's answer instead of paying for it again, as a cache hit would. If the
first call fails, each waiting one makes its own call.
"""

from __future__ import annotations

import asyncio

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMResult


class IdenticalCalls:
    """The first of identical calls asks the model; the others wait for its answer."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        if call.scope.cache_policy != "read_write" or not call.key:
            return await proceed(call)
        in_flight = call.scope.run.identical
        shared = await _answer_of(in_flight.get(call.key))
        if shared is not None:
            return shared
        leader = in_flight[call.key] = asyncio.get_running_loop().create_future()
        try:
            answer = await proceed(call)
        except BaseException:
            _release(in_flight, call.key, leader)
            leader.cancel()  # whoever waited makes its own call
            raise
        _release(in_flight, call.key, leader)
        leader.set_result(answer.result)
        return answer


async def _answer_of(leader: asyncio.Future[LLMResult] | None) -> Answer | None:
    """The answer of an identical call in flight, once it arrives; None if there is none or it failed."""
    if leader is None or leader.get_loop() is not asyncio.get_running_loop():
        return None  # (calls on another event loop, e.g. a test's own, cannot wait for this one's future)
    try:
        result = await asyncio.shield(leader)
    except asyncio.CancelledError:
        if not leader.cancelled():
            raise  # this task itself is being cancelled
        return None
    except Exception:  # noqa: BLE001 - the leader's failure is its own: this call is made anew
        return None
    return Answer(result.as_cached(), Usage(cache_hits=1))


def _release(in_flight: dict[str, asyncio.Future[LLMResult]], key: str, leader: asyncio.Future[LLMResult]) -> None:
    """Stop offering this call's answer to new identical calls (a later leader's entry stays)."""
    if in_flight.get(key) is leader:
        del in_flight[key]
