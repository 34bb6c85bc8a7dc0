"""Stage: when a model still fails after its retries, or its circuit is open, the next model answers.

A workflow's or task's `fallback: [model, provider/model, ...]` lists them in order. Only retryable
failures fall back (429, 5xx, timeouts, lost connections, an open circuit); a refused key or a bad request
would be refused by the next model too, and an answer that stays invalid is the task's problem. Each
model's call takes the whole path below (its own cache key, limits, retries and circuit), and the answer
says which model gave it (`Answer.model`), so records, usage and cost name it.
"""

from __future__ import annotations

from dataclasses import replace

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.keys import request_key
from mp_pipelines.llm.types import LLMError

FALLS_BACK = frozenset({"rate_limit", "server_error", "connection", "timeout", "circuit_open"})


class Fallback:
    """The call's model first; on a failure in FALLS_BACK, each model of the scope's `fallback` in turn."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        chain = call.scope.fallback
        if not chain:
            return await proceed(call)
        try:
            return await proceed(call)
        except LLMError as exc:
            if exc.kind not in FALLS_BACK or call.scope.router is None:
                raise
            failure = exc
        for i, ref in enumerate(chain):
            model, model_id = call.scope.router.route(ref)
            request = replace(call.request, model=model_id)
            key = request_key(request, model.endpoint_key()) if call.key else ""
            scope = replace(call.scope, fallback=chain[i + 1:])
            sink = call.scope.log
            if sink is not None:
                sink.warning(f"⤳ {call.request.label or call.scope.task}: {failure.kind} from "
                             f"{call.request.model}; {ref} answers instead")
            try:
                answer = await proceed(Call(model, request, scope, key, call.deadline))
            except LLMError as exc:
                if exc.kind not in FALLS_BACK:
                    raise
                failure = exc
                continue
            return Answer(answer.result, answer.usage, answer.model or ref)
        raise failure
