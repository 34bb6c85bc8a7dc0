"""Whether telemetry is on in this process, and its OpenTelemetry providers (made on first use).

With no `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`/`..._METRICS_ENDPOINT`), with `OTEL_SDK_DISABLED=true`,
and with no `MP_PROMETHEUS_PUSHGATEWAY`, `active()` is None: nothing is imported, nothing is exported, and the call
path's telemetry stage passes calls straight on.

A run is one trace whose id is the run id's 128 bits, and the run span's id is derived from the run id too: a step
in another process (the multiprocess executor, a Celery worker) parents its span to the run span without any
state passed between processes, and a log line carrying a run id carries its trace id.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from mp_pipelines.telemetry.names import CONTENT_ENV, OPT_IN_ENV, PUSHGATEWAY_ENV, Names, latest_opted_in

log = logging.getLogger(__name__)

SERVICE_NAME = "mp-pipelines"  # unless OTEL_SERVICE_NAME says otherwise
SPAN_QUEUE_SIZE = 65_536  # spans waiting for export, unless OTEL_BSP_MAX_QUEUE_SIZE says otherwise
_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_SDK_DISABLED", PUSHGATEWAY_ENV, OPT_IN_ENV, CONTENT_ENV, "OTEL_EXPORTER_OTLP_PROTOCOL")
# The ids the next span gets (the run span: its ids come from the run id), read by the provider's id generator.
_FORCED_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("mp_forced_ids", default=None)


def trace_id_of(run_id: str) -> int:
    """The trace id of a run: its run id (a UUID) as 128 bits; a hash for any other string."""
    try:
        value = uuid.UUID(run_id).int
    except ValueError:
        value = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:16], "big")
    return value or 1


def trace_id_hex(run_id: str) -> str:
    """The run's trace id as W3C trace-context writes it (32 hex digits)."""
    return f"{trace_id_of(run_id):032x}" if run_id else ""


def run_span_id(run_id: str) -> int:
    """The span id of the run's span (64 bits from the run id)."""
    return int.from_bytes(hashlib.sha256(b"run:" + run_id.encode()).digest()[:8], "big") or 1


def instance_label() -> str:
    """`<host>-<pid>`: this process's Pushgateway group, so concurrent runs never overwrite each other's counts."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Telemetry:
    """What is on in this process: traces (`tracer`), metrics (`metrics`), the attribute names, prompt text."""

    tracer: Any  # an opentelemetry Tracer, or None when no traces are exported
    tracer_provider: Any
    metrics: Any  # a telemetry.metrics.Metrics, or None
    names: Names
    content: bool  # prompt and answer text on spans (MP_TRACE_CONTENT=1)

    def flush(self) -> None:
        """Export what is buffered now (end of a run, or of a step in a process that may exit without notice)."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(10_000)
        if self.metrics is not None:
            self.metrics.flush()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _traces_endpoint() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def _metrics_endpoint() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


RUN_WORKER_PIDS: set[int] = set()  # processes running a run's executor: their steps need no flush of their own
_CACHE: dict[tuple[str | None, ...], Telemetry | None] = {}
_LOCK = threading.Lock()


def active() -> Telemetry | None:
    """This process's telemetry for the current environment, or None when nothing is to be exported."""
    key = tuple(os.environ.get(name) for name in _ENV)
    try:
        return _CACHE[key]
    except KeyError:
        pass
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build()
        return _CACHE[key]


def shutdown() -> None:
    """Export what is buffered and stop this process's exporters (the next `active()` starts afresh)."""
    with _LOCK:
        telemetries = [t for t in _CACHE.values() if t is not None]
        _CACHE.clear()
    for telemetry in telemetries:
        if telemetry.tracer_provider is not None:
            telemetry.tracer_provider.shutdown()
        if telemetry.metrics is not None:
            telemetry.metrics.shutdown()


def _build() -> Telemetry | None:
    sdk_on = not _flag("OTEL_SDK_DISABLED")
    traces = sdk_on and bool(_traces_endpoint())
    otel_metrics = sdk_on and bool(_metrics_endpoint())
    pushgateway = os.environ.get(PUSHGATEWAY_ENV) or None
    if not (traces or otel_metrics or pushgateway):
        return None
    tracer = provider = metrics = None
    if traces:
        provider = _tracer_provider()
        tracer = provider.get_tracer("mp_pipelines")
    if otel_metrics or pushgateway:
        from mp_pipelines.telemetry.metrics import Metrics

        metrics = Metrics(otel=_meter_provider() if otel_metrics else None, pushgateway=pushgateway)
    return Telemetry(tracer, provider, metrics, Names(latest_opted_in()), _flag(CONTENT_ENV))


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    return Resource.create(attributes)  # adds OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES


def _protocol(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").strip()


def _tracer_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if _protocol("TRACES") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the package "
                               "opentelemetry-exporter-otlp-proto-grpc; install it or use http/protobuf") from None
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=_resource(), id_generator=_run_id_generator())
    # A fan-out makes thousands of call spans in seconds: a queue of the SDK's default 2,048 would drop some.
    queue = None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else SPAN_QUEUE_SIZE
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=queue))
    return provider


def _meter_provider() -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if _protocol("METRICS") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        except ImportError:
            raise RuntimeError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the package "
                               "opentelemetry-exporter-otlp-proto-grpc; install it or use http/protobuf") from None
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    return MeterProvider(resource=_resource(), metric_readers=[reader])


def _run_id_generator() -> Any:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RunIdGenerator(RandomIdGenerator):
        """Random ids, except for the run span, whose ids come from the run id."""

        def generate_span_id(self) -> int:
            forced = _FORCED_IDS.get()
            return forced[1] if forced else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _FORCED_IDS.get()
            return forced[0] if forced else super().generate_trace_id()

    return RunIdGenerator()


def run_parent(run_id: str) -> Any:
    """The OpenTelemetry context whose current span is the run's span (in whichever process it was started)."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    parent = SpanContext(trace_id_of(run_id), run_span_id(run_id), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def start_run_span(telemetry: Telemetry, run_id: str, job: str) -> Any:
    """The run's span, with the ids `run_parent` gives every step of the run."""
    from mp_pipelines.telemetry.names import JOB, RUN_ID

    token = _FORCED_IDS.set((trace_id_of(run_id), run_span_id(run_id)))
    try:
        return telemetry.tracer.start_span(f"run {job}", context=_empty_context(),
                                           attributes={RUN_ID: run_id, JOB: job})
    finally:
        _FORCED_IDS.reset(token)


def _empty_context() -> Any:
    from opentelemetry.context import Context

    return Context()
