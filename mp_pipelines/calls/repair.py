"""Stage: an answer that is not the JSON asked for goes back to the model with what is wrong with it.

Up to the task's `repair_attempts` times, as an assistant turn and a user turn naming the problem (and the
schema). Every attempt is a call and counts; the last failure carries the usage of them all (`exc.usage`).
"""

from __future__ import annotations

import json
from dataclasses import replace

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMError, LLMRequest


class Repair:
    """Ask again, with the reason, while an answer is unusable and repairs are left."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        usage = Usage()
        attempts = call.scope.repair_attempts
        for repair in range(attempts + 1):
            try:
                answer = await proceed(call)
            except LLMError as exc:
                # A batch answer comes with its usage (batch price and saving); an online one is counted here.
                own = exc.usage if isinstance(exc.usage, Usage) else (
                    Usage.of_result(exc.result) if exc.result is not None else Usage())
                spent = usage + own
                exc.usage = spent
                if exc.kind != "invalid_output" or exc.result is None or repair == attempts:
                    raise
                usage = spent
                request = call.request
                turns = [{"role": "assistant", "content": exc.result.text},
                         {"role": "user", "content": repair_prompt(exc, request)}]
                call = replace(call, request=replace(request, messages=[*request.messages, *turns]))
                continue
            return answer if repair == 0 else Answer(answer.result, usage + answer.usage)
        raise AssertionError("unreachable: the last repair attempt returns or raises")


def repair_prompt(exc: LLMError, request: LLMRequest) -> str:
    """What the model is told when its JSON answer cannot be used."""
    schema = ""
    if request.json_schema is not None:
        schema = " It must match this JSON schema:\n" + json.dumps(request.json_schema, ensure_ascii=False)
    return (f"Your answer cannot be used: {exc.detail or exc}. Reply again with only the corrected JSON, "
            f"no other text.{schema}")
