"""Counters and histograms of model calls: OpenTelemetry instruments (OTLP) and a Prometheus registry that is
pushed to a Pushgateway (`MP_PROMETHEUS_PUSHGATEWAY`) at the end of each step and run.

Labels are workflow, task, model and provider (and the error kind, token type or item status where they apply):
never a run id or an item, so the number of series stays bounded. Each process pushes its own cumulative counts
under the grouping key {job="mp_pipelines", instance="<host>-<pid>"}, so concurrent runs never overwrite each
other and `sum(...)` over instances is the total.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from mp_pipelines.telemetry.names import (
    ATTRIBUTES,
    OPERATION,
    OTEL_COUNTERS,
    OTEL_DURATION,
    OTEL_TOKEN_USAGE,
    PROMETHEUS,
    PROMETHEUS_LABELS,
    PUSH_JOB,
    PUSHGATEWAY_ENV,
    STATUS,
    TASK,
    TOKEN_TYPES,
    WORKFLOW,
)

log = logging.getLogger(__name__)
PUSH_TIMEOUT_SECONDS = 5.0
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class CallFacts:
    """What one call through the call path amounted to (a cache hit, an answer, or an error)."""

    workflow: str
    task: str
    model: str
    provider: str
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    retries: int = 0
    rate_limited: int = 0
    wait_s: float = 0.0
    error_kind: str | None = None


class Metrics:
    """The process's instruments; `record` adds one call, `push` sends the Prometheus registry to the gateway."""

    def __init__(self, *, otel: Any = None, pushgateway: str | None = None) -> None:
        self._meter_provider = otel
        self._gateway = pushgateway
        self._lock = threading.Lock()
        self._otel = _otel_instruments(otel.get_meter("mp_pipelines")) if otel is not None else None
        self._registry, self._prom = _prometheus_instruments() if pushgateway else (None, None)

    def record(self, facts: CallFacts, names_provider_key: str) -> None:
        """Count one call. `names_provider_key` is the GenAI provider attribute's name (by conventions version)."""
        if self._otel is not None:
            self._record_otel(facts, names_provider_key)
        if self._prom is not None:
            self._record_prometheus(facts)

    def items(self, workflow: str, task: str, status: str, count: int) -> None:
        """Count finished items (fan-out items, or a plain task as one item) by status."""
        if count <= 0:
            return
        if self._otel is not None:
            self._otel["items"].add(count, {WORKFLOW: workflow, TASK: task, STATUS: status})
        if self._prom is not None:
            self._prom["items"].labels(workflow, task, status).inc(count)

    def _record_otel(self, f: CallFacts, provider_key: str) -> None:
        attrs = {ATTRIBUTES["operation"][0]: OPERATION, provider_key: f.provider,
                 ATTRIBUTES["request_model"][0]: f.model, WORKFLOW: f.workflow, TASK: f.task}
        counters = self._otel
        assert counters is not None
        if f.calls:
            counters["calls"].add(f.calls, attrs)
            counters["cost"].add(f.cost_usd, attrs)
            counters["duration"].record(f.latency_s, attrs)
            token_type = ATTRIBUTES["token_type"][0]
            counters["tokens"].record(f.prompt_tokens, {**attrs, token_type: TOKEN_TYPES["input"][0]})
            counters["tokens"].record(f.completion_tokens, {**attrs, token_type: TOKEN_TYPES["output"][0]})
        if f.cache_hits:
            counters["cache_hits"].add(f.cache_hits, attrs)
        if f.retries:
            counters["retries"].add(f.retries, attrs)
        if f.rate_limited:
            counters["rate_limited"].add(f.rate_limited, attrs)
        if f.wait_s:
            counters["waits"].add(f.wait_s, attrs)
        if f.error_kind:
            counters["errors"].add(1, {**attrs, ATTRIBUTES["error_type"][0]: f.error_kind})
            if f.error_kind == "budget":
                counters["budget_stops"].add(1, attrs)

    def _record_prometheus(self, f: CallFacts) -> None:
        prom = self._prom
        assert prom is not None
        labels = (f.workflow, f.task, f.model, f.provider)
        with self._lock:
            if f.calls:
                prom["calls"].labels(*labels).inc(f.calls)
                prom["cost"].labels(*labels).inc(f.cost_usd)
                prom["tokens"].labels(*labels, TOKEN_TYPES["input"][1]).inc(f.prompt_tokens)
                prom["tokens"].labels(*labels, TOKEN_TYPES["output"][1]).inc(f.completion_tokens)
                for _ in range(f.calls):
                    prom["duration"].labels(*labels).observe(f.latency_s / f.calls)
            if f.cache_hits:
                prom["cache_hits"].labels(*labels).inc(f.cache_hits)
            if f.retries:
                prom["retries"].labels(*labels).inc(f.retries)
            if f.rate_limited:
                prom["rate_limited"].labels(*labels).inc(f.rate_limited)
            if f.wait_s:
                prom["waits"].labels(*labels).inc(f.wait_s)
            if f.error_kind:
                prom["errors"].labels(*labels, f.error_kind).inc()
                if f.error_kind == "budget":
                    prom["budget_stops"].labels(*labels).inc()

    def push(self) -> None:
        """Send this process's counts to the Pushgateway (a failure is logged: it never fails a run)."""
        if self._registry is None or self._gateway is None:
            return
        from prometheus_client import pushadd_to_gateway

        from mp_pipelines.telemetry.setup import instance_label

        try:
            with self._lock:
                pushadd_to_gateway(self._gateway, job=PUSH_JOB, grouping_key={"instance": instance_label()},
                                   registry=self._registry, timeout=PUSH_TIMEOUT_SECONDS)
        except Exception as exc:  # the gateway being down must not fail the run
            log.warning("Could not push metrics to the Pushgateway at %s (%s): %s", self._gateway,
                        PUSHGATEWAY_ENV, exc)

    def shutdown(self) -> None:
        """Export and push one last time, then stop the OpenTelemetry metric reader."""
        self.push()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()

    def flush(self) -> None:
        """Export OpenTelemetry metrics now and push the Prometheus registry."""
        if self._meter_provider is not None:
            self._meter_provider.force_flush(10_000)
        self.push()




def _otel_instruments(meter: Any) -> dict[str, Any]:
    instruments: dict[str, Any] = {key: meter.create_counter(name, unit=unit) for key, (name, unit) in OTEL_COUNTERS.items()}
    instruments["tokens"] = meter.create_histogram(OTEL_TOKEN_USAGE, unit="{token}",
                                                   description="Tokens used by one model call")
    instruments["duration"] = meter.create_histogram(OTEL_DURATION, unit="s", description="Seconds per model call")
    return instruments


def _prometheus_instruments() -> tuple[Any, dict[str, Any]]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    labels = PROMETHEUS_LABELS

    def counter(key: str, *extra: str) -> Any:
        name, doc = PROMETHEUS[key]
        return Counter(name, doc, (*labels, *extra), registry=registry)

    instruments = {key: counter(key) for key in ("calls", "cost", "retries", "rate_limited", "waits", "cache_hits",
                                                  "budget_stops")}
    instruments["tokens"] = counter("tokens", "type")
    instruments["errors"] = counter("errors", "kind")
    name, doc = PROMETHEUS["items"]
    instruments["items"] = Counter(name, doc, ("workflow", "task", "status"), registry=registry)
    name, doc = PROMETHEUS["duration"]
    instruments["duration"] = Histogram(name, doc, labels, registry=registry, buckets=DURATION_BUCKETS)
    return registry, instruments
