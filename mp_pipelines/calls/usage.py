"""Usage accounting for LLM calls: one small value type, summed per item, task and run."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

# Every op that calls the model reports its usage under this prefix in its output metadata;
# run summaries add these up, so nothing else may use the prefix for other numbers.
USAGE_PREFIX = "llm/"


@dataclass(frozen=True)
class Usage:
    """Calls made to the model, answers taken from the cache, and what the calls cost."""

    calls: int = 0  # requests answered by the model (an invalid answer that was repaired counts too)
    cache_hits: int = 0  # answers taken from the response cache (or a resumed run's checkpoint): free
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # summed over calls
    cost_usd: float = 0.0  # from the price table; 0 for models it does not list
    retries: int = 0  # requests sent again after a retryable failure (calls/retry.py)
    rate_limited: int = 0  # HTTP 429 answers received
    batch_requests: int = 0  # calls answered through the Batch API (counted in `calls` too)
    batch_saving_usd: float = 0.0  # what those calls would have cost more at online prices

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @classmethod
    def of_result(cls, result: Any) -> Usage:
        """Usage of one LLMResult: a call with its tokens and cost, or a free cache hit."""
        if result.cached:
            return cls(cache_hits=1)
        return cls(calls=1, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   latency_s=result.latency_s, cost_usd=result.cost_usd)

    @classmethod
    def of_rows(cls, rows: Any) -> Usage:
        """The sum over a DataFrame of item records (their usage columns)."""
        values = {}
        for f in fields(cls):
            kind = type(getattr(cls(), f.name))
            values[f.name] = kind(rows[f.name].sum()) if f.name in rows and len(rows) else kind(0)
        return cls(**values)

    def as_metadata(self) -> dict[str, int | float]:
        return {f"{USAGE_PREFIX}{f.name}": _round(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Usage:
        """Read usage back from event metadata (values may be Dagster MetadataValue objects)."""
        values = {}
        for f in fields(cls):
            raw = metadata.get(f"{USAGE_PREFIX}{f.name}")
            raw = getattr(raw, "value", raw)
            values[f.name] = type(getattr(cls(), f.name))(raw or 0)
        return cls(**values)

    def as_dict(self) -> dict[str, int | float]:
        return {f.name: _round(getattr(self, f.name)) for f in fields(self)}


def _round(value: int | float) -> int | float:
    return round(value, 9) if isinstance(value, float) else value  # costs of single calls are ~1e-6 USD
