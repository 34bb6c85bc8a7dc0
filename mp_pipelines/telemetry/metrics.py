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
from mp_pipelines.telemetry.tally import ModelTally, StepTally

log = logging.getLogger(__name__)
PUSH_TIMEOUT_SECONDS = 5.0
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The process's instruments; `record_step` adds a step's calls, `push` sends the Prometheus registry."""

    def __init__(self, *, otel: Any = None, pushgateway: str | None = None) -> None:
        self._meter_provider = otel
        self._gateway = pushgateway
        self._lock = threading.Lock()
        self._otel = _otel_instruments(otel.get_meter("mp_pipelines")) if otel is not None else None
        self._registry, self._prom = _prometheus_instruments() if pushgateway else (None, None)

    def record_step(self, tally: StepTally, provider_key: str) -> None:
        """Count the calls of one step (from its tally, when the step ends: nothing on the calls' event loop).
        `provider_key` is the GenAI provider attribute's name in the conventions version in use."""
        for (model, provider), counts in tally.models.items():
            if self._otel is not None:
                self._record_otel(tally.workflow, tally.task, model, provider, counts, provider_key)
            if self._prom is not None:
                with self._lock:
                    self._record_prometheus((tally.workflow, tally.task, model, provider), counts)

    def items(self, workflow: str, task: str, status: str, count: int) -> None:
        """Count finished items (fan-out items, or a plain task as one item) by status."""
        if count <= 0:
            return
        if self._otel is not None:
            self._otel["items"].add(count, {WORKFLOW: workflow, TASK: task, STATUS: status})
        if self._prom is not None:
            self._prom["items"].labels(workflow, task, status).inc(count)

    def _record_otel(self, workflow: str, task: str, model: str, provider: str, t: ModelTally,
                     provider_key: str) -> None:
        attrs = {ATTRIBUTES["operation"][0]: OPERATION, provider_key: provider,
                 ATTRIBUTES["request_model"][0]: model, WORKFLOW: workflow, TASK: task}
        instruments = self._otel
        assert instruments is not None
        if t.calls:
            instruments["calls"].add(t.calls, attrs)
            instruments["cost"].add(t.cost_usd, attrs)
            token_type = ATTRIBUTES["token_type"][0]
            inputs, outputs = {**attrs, token_type: TOKEN_TYPES["input"][0]}, {**attrs, token_type: TOKEN_TYPES["output"][0]}
            for latency, prompt, completion in zip(t.latencies, t.input_tokens, t.output_tokens):
                instruments["duration"].record(latency, attrs)
                instruments["tokens"].record(prompt, inputs)
                instruments["tokens"].record(completion, outputs)
        for key, value in (("cache_hits", t.cache_hits), ("retries", t.retries), ("rate_limited", t.rate_limited),
                           ("waits", t.wait_s), ("budget_stops", t.errors.get("budget", 0))):
            if value:
                instruments[key].add(value, attrs)
        for kind, count in t.errors.items():
            instruments["errors"].add(count, {**attrs, ATTRIBUTES["error_type"][0]: kind})

    def _record_prometheus(self, labels: tuple[str, str, str, str], t: ModelTally) -> None:
        prom = self._prom
        assert prom is not None
        if t.calls:
            prom["calls"].labels(*labels).inc(t.calls)
            prom["cost"].labels(*labels).inc(t.cost_usd)
            prom["tokens"].labels(*labels, TOKEN_TYPES["input"][1]).inc(t.prompt_tokens)
            prom["tokens"].labels(*labels, TOKEN_TYPES["output"][1]).inc(t.completion_tokens)
            duration = prom["duration"].labels(*labels)
            for latency in t.latencies:
                duration.observe(latency)
        for key, value in (("cache_hits", t.cache_hits), ("retries", t.retries), ("rate_limited", t.rate_limited),
                           ("waits", t.wait_s), ("budget_stops", t.errors.get("budget", 0))):
            if value:
                prom[key].labels(*labels).inc(value)
        for kind, count in t.errors.items():
            prom["errors"].labels(*labels, kind).inc(count)

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
