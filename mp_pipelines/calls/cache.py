"""Stage: never pay twice. A stored answer ends the call; a new answer is kept for the next one.

Where answers live and how they are keyed is `store.py`. On resume a run first reads its run family's
checkpoint (answers kept under each call's label), then the shared cache.
"""

from __future__ import annotations

from dataclasses import replace

from mp_pipelines.calls.call import Answer, Call, CallScope, Proceed
from mp_pipelines.calls.keys import Entry, checkpoint_key
from mp_pipelines.calls.store import SHARED
from mp_pipelines.calls.usage import Usage

READS_SHARED = frozenset({"read_write", "read"})
WRITES_SHARED = frozenset({"read_write", "write"})


class ResponseCache:
    """Answers from the response store when the scope allows; new answers into it."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        scope = call.scope
        if scope.store is None:
            return await proceed(call)
        stored = await _stored_answer(scope, call.key, call.request.label)
        if stored is not None:
            return stored
        answer = await proceed(call)
        _remember(scope, call.key, call.request.label, answer)
        return answer


async def _stored_answer(scope: CallScope, key: str, label: str) -> Answer | None:
    """A stored answer this call may use: its run family's checkpoint when resuming, then the shared cache."""
    assert scope.store is not None
    found = None
    if scope.resuming:
        found = await scope.store.aget(scope.root_run_id, checkpoint_key(key, label))
        if found is not None and scope.step_retry:
            # Paid for by this run's earlier attempt of the step, whose usage no output reported: count it here.
            paid = replace(found, cached=False, latency_s=0.0)
            return Answer(found, Usage.of_result(paid))
    # On resume the shared cache also holds the family's answers when the policy wrote them there (`write`).
    if found is None and (scope.cache_policy in READS_SHARED or (scope.resuming and scope.cache_policy == "write")):
        found = await scope.store.aget(SHARED, key)
    return None if found is None else Answer(found, Usage(cache_hits=1))


def _remember(scope: CallScope, key: str, label: str, answer: Answer) -> None:
    """Keep a new answer: in the shared cache when the policy writes, else in the run family's checkpoint."""
    if scope.store is None or answer.result.cached:
        return
    shared = scope.cache_policy in WRITES_SHARED
    entry_key = key if shared else checkpoint_key(key, label)
    scope.store.put(Entry(SHARED if shared else scope.root_run_id, entry_key, scope.workflow, scope.task,
                          answer.result))
