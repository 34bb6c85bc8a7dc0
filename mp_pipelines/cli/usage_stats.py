"""Model-call figures over time, read from the instance's event log (SQLite or PostgreSQL), not from logs.

Every step that calls the model stores what its calls did as `mp/calls` metadata on its output (a checks step: on
its first check result, its judges' calls counted as the task's), or on its failure (`telemetry/tally.py`): per
model, the answers, cache hits, tokens, cost, HTTP 429s and each answer's latency, and the step's failed items.
`usage_rows` adds those up per workflow, task, model or day (UTC).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from mp_pipelines.telemetry.tally import TALLY_METADATA_KEY

GROUPINGS = ("workflow", "task", "model", "day")
_RELATIVE = re.compile(r"(\d+)\s*([dh])")

if TYPE_CHECKING:
    import dagster as dg


class SinceError(ValueError):
    """A --since value that is not `7d`, `24h` or `YYYY-MM-DD`."""


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """The UTC time `value` names: `Nd` or `Nh` before now, or midnight UTC of a date `YYYY-MM-DD`."""
    now = now or datetime.now(timezone.utc)
    text = value.strip().lower()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - (timedelta(days=amount) if unit == "d" else timedelta(hours=amount))
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise SinceError(f"--since {value!r}: use a number of days or hours (7d, 24h) or a date (2026-12-01)") from None


@dataclass
class Call:
    """One step's calls to one model, as stored in its `mp/calls` metadata."""

    workflow: str
    task: str
    model: str
    day: str
    calls: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    rate_limited: int
    failures: int
    latencies: list[float]


@dataclass
class Group:
    key: dict[str, str]
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    failures: int = 0
    rate_limited: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, call: Call) -> None:
        self.calls += call.calls
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.cost_usd += call.cost_usd
        self.cache_hits += call.cache_hits
        self.failures += call.failures
        self.rate_limited += call.rate_limited
        self.latencies.extend(call.latencies)

    def as_dict(self) -> dict[str, Any]:
        answered = self.calls + self.cache_hits
        return {**self.key, "calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost_usd, 9),
                "cache_hits": self.cache_hits,
                "cache_hit_rate": round(self.cache_hits / answered, 4) if answered else 0.0,
                "failures": self.failures, "p50_latency_s": percentile(self.latencies, 50),
                "p95_latency_s": percentile(self.latencies, 95), "rate_limited": self.rate_limited}


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least p % of the values at or below it)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)], 4)


def _metadata(event: Any) -> dict[str, Any]:
    import dagster as dg

    data = event.event_specific_data
    if event.event_type == dg.DagsterEventType.STEP_FAILURE:
        user = getattr(data, "user_failure_data", None)
        return dict(getattr(user, "metadata", None) or {})
    return dict(getattr(data, "metadata", None) or {})


def stored_calls(instance: dg.DagsterInstance, since: datetime | None) -> Iterator[Call]:
    """The `mp/calls` records of every step output, check result and failure since `since` (every one when None)."""
    import dagster as dg  # not at import time: `mp-pipelines list` and other quick commands stay light

    after = since.timestamp() if since is not None else None
    for event_type in (dg.DagsterEventType.STEP_OUTPUT, dg.DagsterEventType.STEP_FAILURE,
                       dg.DagsterEventType.ASSET_CHECK_EVALUATION):  # a checks step's judges
        records = instance.get_event_records(dg.EventRecordsFilter(event_type=event_type, after_timestamp=after),
                                             ascending=True)
        for record in records:
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            value = _metadata(event).get(TALLY_METADATA_KEY)
            tally = getattr(value, "value", value)
            if isinstance(tally, dict):
                day = datetime.fromtimestamp(record.timestamp, timezone.utc).date().isoformat()
                yield from _calls_of(tally, day)


def _calls_of(tally: dict[str, Any], day: str) -> Iterator[Call]:
    models = tally.get("models") or []
    failures = int(tally.get("failures") or 0)
    if not models and failures:  # failed before any call: its items still failed
        models = [{"model": "unknown"}]
    for index, row in enumerate(models):
        yield Call(str(tally.get("workflow", "")), str(tally.get("task", "")), str(row.get("model", "unknown")), day,
                   int(row.get("calls", 0)), int(row.get("cache_hits", 0)), int(row.get("prompt_tokens", 0)),
                   int(row.get("completion_tokens", 0)), float(row.get("cost_usd", 0.0)),
                   int(row.get("rate_limited", 0)), failures if index == 0 else 0,
                   [float(x) for x in row.get("latencies", [])])


def _key(call: Call, by: str) -> dict[str, str]:
    if by == "task":
        return {"workflow": call.workflow, "task": call.task}
    return {by: getattr(call, by)}


def group_calls(calls: Iterable[Call], by: str) -> list[Group]:
    """The calls added up per `by` (one of GROUPINGS), ordered by key."""
    if by not in GROUPINGS:
        raise ValueError(f"--by {by!r}: use one of {', '.join(GROUPINGS)}")
    groups: dict[tuple[str, ...], Group] = {}
    for call in calls:
        key = _key(call, by)
        group = groups.setdefault(tuple(key.values()), Group(key))
        group.add(call)
    return [groups[key] for key in sorted(groups)]


def usage_rows(instance: dg.DagsterInstance, *, since: datetime | None, by: str) -> list[dict[str, Any]]:
    """What `stats --json` prints: one object per group with its key and figures."""
    return [group.as_dict() for group in group_calls(stored_calls(instance, since), by)]
