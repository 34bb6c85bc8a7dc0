"""Usage accounting for LLM calls: one small value type, summed per item, task and run."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

# Every op that calls the model reports its usage under this prefix in its output metadata;
# run summaries add these up, so nothing else may use the prefix for other numbers.
USAGE_PREFIX = "llm/"


@dataclass(frozen=True)
class Usage:
    """Calls made to the model and what they cost in tokens and seconds."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # summed over calls

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @classmethod
    def of_result(cls, result: Any) -> Usage:
        """Usage of one LLMResult."""
        return cls(1, result.prompt_tokens, result.completion_tokens, result.latency_s)

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
    return round(value, 4) if isinstance(value, float) else value
