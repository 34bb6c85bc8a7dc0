"""The calls of one step, counted as they happen, for the step's `mp/calls` metadata (`mp-pipelines stats`).

A step sets a `StepTally` as current (a context variable) before its calls; the calls run on the shared event
loop, which runs each coroutine in a copy of the submitting thread's context, so the call path's telemetry
stage finds the step's tally without any argument passed through the task runner. The tally also carries the
telemetry the step found on (`telemetry.setup.active()`, read once per step), so a call reads one context
variable and no environment variable.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

TALLY_METADATA_KEY = "mp/calls"  # step output (or failure) metadata: what `mp-pipelines stats` reads
LATENCY_DIGITS = 4


@dataclass
class ModelTally:
    """The calls of one step to one model."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0
    retries: int = 0  # HTTP attempts beyond the first
    wait_s: float = 0.0  # Retry-After seconds asked by 429s
    errors: dict[str, int] = field(default_factory=dict)  # failed calls by error kind
    latencies: list[float] = field(default_factory=list)  # seconds, one per model answer
    input_tokens: list[int] = field(default_factory=list)  # per answer (metrics' token histogram)
    output_tokens: list[int] = field(default_factory=list)


@dataclass
class StepTally:
    """Per model and provider: the step's calls, tokens, cost, cache hits, 429s and each answer's latency."""

    workflow: str
    task: str
    telemetry: Any = None  # the process's telemetry.setup.Telemetry when exporting, read once per step
    models: dict[tuple[str, str], ModelTally] = field(default_factory=dict)

    def add(self, model: str, provider: str, calls: int, cache_hits: int, prompt_tokens: int, completion_tokens: int,
            cost_usd: float, latency_s: float, rate_limited: int, retries: int, wait_s: float,
            error_kind: str | None) -> None:
        """Count one call through the call path (on the shared loop: plain arithmetic, nothing exported)."""
        tally = self.models.get((model, provider))
        if tally is None:
            tally = self.models[(model, provider)] = ModelTally()
        tally.calls += calls
        tally.cache_hits += cache_hits
        tally.prompt_tokens += prompt_tokens
        tally.completion_tokens += completion_tokens
        tally.cost_usd += cost_usd
        tally.rate_limited += rate_limited
        tally.retries += retries
        tally.wait_s += wait_s
        if error_kind is not None:
            tally.errors[error_kind] = tally.errors.get(error_kind, 0) + 1
        if calls:
            tally.latencies.extend([round(latency_s / calls, LATENCY_DIGITS)] * calls)
            tally.input_tokens.append(prompt_tokens)
            tally.output_tokens.append(completion_tokens)

    def as_metadata(self, failures: int) -> dict[str, Any]:
        """The JSON value stored under TALLY_METADATA_KEY."""
        return {"workflow": self.workflow, "task": self.task, "failures": failures,
                "models": [{"model": model, "provider": provider, "calls": t.calls, "cache_hits": t.cache_hits,
                            "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                            "cost_usd": round(t.cost_usd, 9), "rate_limited": t.rate_limited, "errors": dict(t.errors),
                            "latencies": t.latencies}
                           for (model, provider), t in sorted(self.models.items())]}


_CURRENT: contextvars.ContextVar[StepTally | None] = contextvars.ContextVar("mp_step_tally", default=None)


def current_tally() -> StepTally | None:
    return _CURRENT.get()


@contextmanager
def tallying(tally: StepTally) -> Iterator[StepTally]:
    """Make `tally` the current step's tally in this thread's context (and so in its calls on the shared loop)."""
    token = _CURRENT.set(tally)
    try:
        yield tally
    finally:
        _CURRENT.reset(token)
