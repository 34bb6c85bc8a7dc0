"""A real OTLP/HTTP receiver on loopback for tests: it decodes what the OpenTelemetry exporter sends with
opentelemetry-proto (protobuf, as `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` sends it) and keeps the spans and
metric points, so a test can check the trace a run exported."""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    resource: dict[str, Any]


@dataclass
class Received:
    spans: list[ReceivedSpan] = field(default_factory=list)
    # name → {attributes: latest value}: the SDK exports cumulative sums, so the latest export holds the total
    metrics: dict[str, dict[tuple[tuple[str, Any], ...], float]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # paths, in order


class OTLPReceiver:
    """`with OTLPReceiver() as receiver:` → receiver.endpoint (http://127.0.0.1:PORT), receiver.received."""

    def __init__(self) -> None:
        self.received = Received()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._take(self.path, body)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _take(self, path: str, body: bytes) -> None:
        with self._lock:
            self.received.requests.append(path)
            if path.endswith("/v1/traces"):
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            self.received.spans.append(ReceivedSpan(
                                span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                                {a.key: _value(a.value) for a in span.attributes},
                                [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events],
                                span.status.code, resource))
            elif path.endswith("/v1/metrics"):
                request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        for metric in scope_metrics.metrics:
                            self._take_metric(metric)

    def _take_metric(self, metric: Any) -> None:
        kind = metric.WhichOneof("data")
        points = getattr(metric, kind).data_points
        for point in points:
            attrs = {a.key: _value(a.value) for a in point.attributes}
            if kind == "histogram":
                value = point.sum
            else:
                value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
            self.received.metrics.setdefault(metric.name, {})[tuple(sorted(attrs.items()))] = value

    def metric(self, name: str, **attrs: Any) -> float:
        """The total of metric `name` over the series whose attributes include `attrs`."""
        with self._lock:
            series = self.received.metrics.get(name, {})
            return sum(v for key, v in series.items() if all(dict(key).get(k) == want for k, want in attrs.items()))

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.received.spans)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[ReceivedSpan]:
        """The spans once `predicate(spans)` holds; AssertionError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > end:
                raise AssertionError(f"the OTLP receiver got {len(spans)} span(s), not what was expected: "
                                     f"{sorted({s.name for s in spans})}")
            time.sleep(0.1)

    def __enter__(self) -> OTLPReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":  # a receiver for benchmarks: prints its endpoint, then span counts every 10 s
    with OTLPReceiver() as running:
        print(f"OTEL_EXPORTER_OTLP_ENDPOINT={running.endpoint}", flush=True)
        while True:
            time.sleep(10)
            print(f"{len(running.spans())} spans, {len(running.received.requests)} requests", flush=True)
