"""Stage: what each call did, told to telemetry (a GenAI span, metrics) and to the step's tally.

Calls made inside a step are told (`factory/observe.py` sets the step's tally, and with it the telemetry that
is on); a call of the path outside any step passes straight on. It stands first in the path, so it sees every
call: cache hits (`mp.cache_hit`), answers, errors, and budget stops (`mp.budget_stop` events); HTTP responses
the client retried (429s with their Retry-After among them) become `mp.retry` events. With no exporter
configured only the step's tally is kept."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.deadline import TaskTimeout
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.headers import retry_after_seconds
from mp_pipelines.llm.types import LLMError, LLMResult
from mp_pipelines.telemetry import names as n
from mp_pipelines.telemetry.setup import Telemetry
from mp_pipelines.telemetry.tally import StepTally, current_tally


class _Responses:
    """The HTTP responses of one call: every non-2xx one is a retry or the final error."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed: list[tuple[int, float | None]] = []

    def __call__(self, status: int, headers: Mapping[str, str]) -> None:
        if status >= 400:
            self.failed.append((status, retry_after_seconds(headers) if status == 429 else None))

    @property
    def rate_limited(self) -> int:
        return sum(1 for status, _ in self.failed if status == 429)

    @property
    def wait_s(self) -> float:
        return sum(wait or 0.0 for status, wait in self.failed if status == 429)


class CallTelemetry:
    """A span per call (GenAI conventions) and the call's line in the step's tally (which the metrics count)."""

    def __call__(self, call: Call, proceed: Proceed) -> Awaitable[Answer]:
        tally = current_tally()
        if tally is None:  # not inside a step (a direct call of the path): the next stage's coroutine as is
            return proceed(call)
        return self._observed(call, proceed, tally)

    async def _observed(self, call: Call, proceed: Proceed, tally: StepTally) -> Answer:
        telemetry: Telemetry | None = tally.telemetry
        responses = _Responses()
        call = call.observed_by(responses)
        span = _start_span(telemetry, call) if telemetry is not None and telemetry.tracer is not None else None
        try:
            answer = await proceed(call)
        except LLMError as exc:
            usage = exc.usage if isinstance(exc.usage, Usage) else Usage()
            _told(telemetry, tally, span, call, exc.result, usage, responses, exc)
            raise
        except BaseException as exc:
            if isinstance(exc, TaskTimeout):
                model = call.request.model or call.model.default_model
                tally.add(model, _provider(call), 0, 0, 0, 0, 0.0, 0.0, responses.rate_limited, 0, responses.wait_s,
                          "timeout")
            if span is not None:
                _end_error(span, "timeout" if isinstance(exc, TaskTimeout) else type(exc).__name__, str(exc))
            raise
        _told(telemetry, tally, span, call, answer.result, answer.usage, responses, None)
        return answer


def _start_span(telemetry: Telemetry, call: Call) -> Any:
    from opentelemetry.trace import SpanKind

    names, request, scope = telemetry.names, call.request, call.scope
    model = request.model or call.model.default_model
    attributes: dict[str, Any] = {names["operation"]: n.OPERATION, names["request_model"]: model,
                                  n.WORKFLOW: scope.workflow, n.TASK: scope.task, n.LABEL: request.label}
    if request.temperature is not None:
        attributes[names["temperature"]] = request.temperature
    if request.max_tokens is not None:
        attributes[names["max_tokens"]] = request.max_tokens
    attributes[names["output_type"]] = "json" if request.json_output else "text"
    span = telemetry.tracer.start_span(f"{n.OPERATION} {model}", kind=SpanKind.CLIENT, attributes=attributes)
    if telemetry.content:
        if names.latest:
            span.set_attribute(names["input_messages"], json.dumps(request.messages, ensure_ascii=False))
        else:
            for message in request.messages:
                span.add_event(f"gen_ai.{message.get('role', 'user')}.message",
                               {"content": message.get("content", "")})
    return span


def _told(telemetry: Telemetry | None, tally: StepTally, span: Any, call: Call, result: LLMResult | None,
          usage: Usage, responses: _Responses, error: LLMError | None) -> None:
    """Tell the step's tally (and through it, the metrics) and the span what the call amounted to."""
    model = result.model if result is not None else (call.request.model or call.model.default_model)
    provider = result.provider if result is not None else _provider(call)
    attempts = result.attempts if result is not None else (error.attempts if error is not None else 0)
    retries = max(attempts - 1, 0)
    tally.add(model, provider, usage.calls, usage.cache_hits, usage.prompt_tokens, usage.completion_tokens,
              usage.cost_usd, usage.latency_s, responses.rate_limited, retries, responses.wait_s,
              error.kind if error is not None else None)
    if span is None:  # metrics are counted from the tally when the step ends, off this loop
        return
    names = telemetry.names if telemetry is not None else None
    assert names is not None
    # One call, few attributes: each costs CPU on the loop every call shares. Project counters only when not 0/1.
    attributes: dict[str, Any] = {names["provider"]: provider, names["input_tokens"]: usage.prompt_tokens,
                                  names["output_tokens"]: usage.completion_tokens, n.COST: usage.cost_usd}
    if usage.cache_hits:
        attributes[n.CACHE_HIT] = True
    if usage.calls > 1:
        attributes[n.CALLS] = usage.calls
    if attempts > 1:
        attributes[n.HTTP_ATTEMPTS] = attempts
    if responses.rate_limited:
        attributes[n.RATE_LIMITED] = responses.rate_limited
    if result is not None:
        attributes[names["response_model"]] = result.model
        if result.finish_reason:
            attributes[names["finish_reasons"]] = (result.finish_reason,)
    span.set_attributes(attributes)
    if usage.cache_hits:
        span.add_event(n.EVENT_CACHE_HIT)
    for status, wait in responses.failed[: max(retries, 0)]:
        span.add_event(n.EVENT_RETRY, {names["http_status"]: status, **({"retry_after_s": wait} if wait else {})})
    if telemetry.content and result is not None and error is None:
        if names.latest:
            span.set_attribute(names["output_messages"], json.dumps(
                [{"role": "assistant", "content": result.text, "finish_reason": result.finish_reason}],
                ensure_ascii=False))
        else:
            span.add_event(names["output_messages"], {"content": result.text})
    if error is not None:
        if error.kind == "budget":
            span.add_event(n.EVENT_BUDGET_STOP, {"message": str(error)})
        if error.status_code:
            span.set_attribute(names["http_status"], error.status_code)
        _end_error(span, error.kind, str(error))
        return
    span.end()


def _end_error(span: Any, kind: str, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(n.ATTRIBUTES["error_type"][0], kind)
    span.set_status(Status(StatusCode.ERROR, message[:500]))
    span.end()


def _provider(call: Call) -> str:
    name = getattr(call.model, "provider_name", None)
    return name if isinstance(name, str) else "unknown"
