"""Stage: retries of one model call, the only request-level retry loop (the openai client makes none).

A retryable failure (HTTP 429, 500, 502, 503, 504 and other 5xx, a timeout, a refused, reset or cut-off
connection, a 200 whose body is not a completion) is sent again after a back-off, until the retry budget
runs out: `DEFAULT_RETRY` unless the task sets `retries:` (its max_retries, delay, backoff, jitter).
The default backs off exponentially with full jitter (a random wait between 0 and 0.5 s × 2ⁿ⁻¹, at most
30 s) and waits at least what a response's `Retry-After` asks (at most 60 s). No attempt starts once
`window` seconds have passed since the first. Every attempt goes through the limits below again, so a 429
pauses the model's traffic and 5xx shrink its concurrency (`limits.py`); a run of failures opens the
endpoint's circuit (`circuit.py`). Errors no retry can fix (400, 401, 403, 404, invalid requests) fail at
once. The maths behind the defaults is in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass, replace

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.circuit import CIRCUITS, Circuit, CircuitOpen
from mp_pipelines.calls.settings import number_setting
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMError
from mp_pipelines.spec.models import RetrySpec

log = logging.getLogger(__name__)

# Kinds of failure another attempt may cure. `invalid_output` is Repair's (an answer arrived), the rest are final.
RETRIED_KINDS = frozenset({"rate_limit", "server_error", "connection", "timeout"})
MAX_RETRY_AFTER_SECONDS = 60.0
BASE_DELAY_ENV = "MP_RETRY_BASE_DELAY"  # seconds; tests shorten the default back-off with it


@dataclass(frozen=True)
class RetryBudget:
    """How often and how patiently one call is retried."""

    attempts: int  # in all, the first included
    delay: float  # seconds: the back-off's base
    backoff: str  # exponential | linear | constant
    jitter: str  # full | plus_minus | none
    max_delay: float = 30.0  # seconds, one back-off at most
    window: float = 900.0  # seconds after the first attempt during which retries may start

    def delay_before(self, retry: int, retry_after: float | None, rand: float) -> float:
        """Seconds to wait before retry number `retry` (1-based); at least a Retry-After (capped)."""
        base = self.delay
        delay = {"exponential": base * 2 ** (retry - 1), "linear": base * retry}.get(self.backoff, base)
        delay = min(delay, self.max_delay)
        if self.jitter == "full":
            delay = rand * delay
        elif self.jitter == "plus_minus":
            delay = max(delay + (2 * rand - 1) * base, 0.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
        return delay

    def describe(self) -> str:
        return f"{self.attempts} attempts within {self.window:g} s"


DEFAULT_RETRY = RetryBudget(attempts=16, delay=0.5, backoff="exponential", jitter="full")


def retry_budget(retries: RetrySpec | None) -> RetryBudget:
    """The task's `retries:` as a budget, else the default (its base delay from MP_RETRY_BASE_DELAY if set)."""
    if retries is not None:
        return RetryBudget(1 + retries.max_retries, retries.delay, retries.backoff or "constant",
                           retries.jitter or "none", max_delay=max(retries.delay, DEFAULT_RETRY.max_delay))
    base = number_setting(BASE_DELAY_ENV, DEFAULT_RETRY.delay, read=float, valid=lambda value: 0 <= value <= 60,
                          rule="a number of seconds from 0 to 60")
    return DEFAULT_RETRY if base == DEFAULT_RETRY.delay else replace(DEFAULT_RETRY, delay=base)


def _why(exc: LLMError) -> str:
    if exc.status_code is not None:
        return f"HTTP {exc.status_code}"
    return {"timeout": "a timeout", "connection": "a lost connection"}.get(exc.kind, "an unusable answer")


class Retries:
    """Send the call again after retryable failures, within its retry budget; count retries and 429s.

    The clients of a run make no retries of their own (max_retries=0), so each attempt is one HTTP request and
    its failure's status and Retry-After are on the LLMError."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        model = call.request.model or call.model.default_model
        circuit = CIRCUITS.circuit(call.model.endpoint_key(), model) if CIRCUITS.unsettled else None
        if circuit is None or circuit.closed:
            try:
                answer = await proceed(call)  # the fair-weather path: one attempt, nothing to count
            except LLMError as exc:
                circuit = circuit or CIRCUITS.circuit(call.model.endpoint_key(), model)
                _note(call.scope, circuit.record(exc.kind, False), circuit)
                if exc.kind not in RETRIED_KINDS:
                    raise
                return await self._retry(call, proceed, model, circuit, exc)
            if circuit is not None and circuit.failures:
                circuit.record(None, False)
            return answer
        return await self._retry(call, proceed, model, circuit, None)

    async def _retry(self, call: Call, proceed: Proceed, model: str, circuit: Circuit,
                     failure: LLMError | None) -> Answer:
        scope = call.scope
        budget = scope.retry_budget or DEFAULT_RETRY
        give_up_at = time.monotonic() + budget.window
        if call.deadline is not None:
            give_up_at = min(give_up_at, call.deadline)
        spent, throttled, label = Usage(), 0, call.request.label or scope.task
        attempt = 0 if failure is None else 1
        while True:
            if failure is not None:
                spent = spent + (failure.usage or Usage())
                throttled += failure.kind == "rate_limit"
                delay = budget.delay_before(attempt, failure.retry_after, random.random())
                if (failure.kind not in RETRIED_KINDS or attempt >= budget.attempts
                        or time.monotonic() + delay >= give_up_at):
                    raise _final(failure, attempt, spent + Usage(retries=attempt - 1, rate_limited=throttled),
                                 budget) from None
                if failure.kind == "rate_limit" and failure.retry_after is not None:
                    _say(scope, f"⏸ {label}: HTTP 429 from {model}: its calls pause "
                                f"{min(failure.retry_after, MAX_RETRY_AFTER_SECONDS):.1f} s (Retry-After); "
                                f"retry {attempt}/{budget.attempts - 1}")
                else:
                    _say(scope, f"↻ {label}: retrying in {delay:.1f} s after {_why(failure)} from {model} "
                                f"(retry {attempt}/{budget.attempts - 1})")
                await asyncio.sleep(delay)
            attempt += 1
            probe = False if circuit.closed else await circuit.admit(give_up_at, bool(scope.fallback), budget.window)
            try:
                answer = await proceed(call)
            except LLMError as exc:
                _note(scope, circuit.record(exc.kind, probe), circuit)
                failure = exc
                continue
            except BaseException:
                if probe:
                    circuit.abandon_probe()
                raise
            _note(scope, circuit.record(None, probe), circuit)
            result = replace(answer.result, attempts=attempt) if attempt > 1 else answer.result
            return Answer(result, answer.usage + spent + Usage(retries=attempt - 1, rate_limited=throttled))


def _final(exc: LLMError, attempts: int, spent: Usage, budget: RetryBudget) -> LLMError:
    """The last failure, saying how many attempts the call made in all and what it spent."""
    if attempts > 1:
        message = re.sub(r"after \d+ attempts?", f"after {attempts} attempts", str(exc), count=1)
        if message == str(exc):
            message = f"{message} ({attempts} attempts)"
        if exc.kind in RETRIED_KINDS and attempts >= budget.attempts:
            message += f"; its retry budget ({budget.describe()}) is spent"
        exc.args = (message,)
    exc.attempts = max(exc.attempts, attempts)
    exc.usage = spent
    return exc


def _say(scope: object, line: str) -> None:
    """A progress line: to the op's log (the run's event log, shown by `mp-pipelines run`), else this module's."""
    sink = getattr(scope, "log", None)
    (sink or log).warning(line)


def _note(scope: object, change: str | None, circuit: object) -> None:
    if change == "opened":
        _say(scope, f"⏸ circuit of {circuit.name} open after {circuit.failures} failures in a row: "  # type: ignore[attr-defined]
                    f"calls pause {circuit.cooldown:g} s, then one probes")  # type: ignore[attr-defined]
    elif change == "closed":
        _say(scope, f"▶ circuit of {circuit.name} closed: the probe was answered")  # type: ignore[attr-defined]


__all__ = ["DEFAULT_RETRY", "RETRIED_KINDS", "CircuitOpen", "RetryBudget", "Retries", "retry_budget"]
