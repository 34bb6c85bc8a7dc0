"""Stage: the model itself, the last stop of every call that nothing before could answer."""

from __future__ import annotations

from collections.abc import Mapping

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.usage import Usage


class ModelCall:
    """Send the request to the model; every HTTP response it gets is shown to the call's observers."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        observers = call.observers

        def observe(status: int, headers: Mapping[str, str]) -> None:
            for observer in observers:
                observer(status, headers)

        result = await call.model.acomplete(call.request, on_response=observe if observers else None)
        return Answer(result, Usage.of_result(result))
