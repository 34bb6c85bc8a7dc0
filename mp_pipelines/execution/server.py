"""A real loopback OpenAI-compatible HTTP server around the simulated model, with scripted faults.

Tests use it to drive the openai client over real HTTP (429s, 500s, slow answers, exact answer
texts); `serve` backs the `mp-pipelines serve-model` command. Latency is an async sleep, so one
process holds thousands of concurrent requests without a thread per request.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mp_pipelines.execution.simulated import SimulatedModel

_REASONS = {
    400: "Bad request.",
    401: "Incorrect API key provided.",
    403: "Forbidden.",
    404: "Not found.",
    408: "Request timeout.",
    429: "Rate limit reached.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
}


@dataclass(frozen=True)
class Fault:
    """One scripted reaction: sleep `delay` seconds, then answer `status` (with `body`) or `content`."""

    status: int | None = None  # an error status to return instead of an answer
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sleep before reacting
    content: str | None = None  # exact answer text of a normal 200 completion
    body: dict[str, Any] | None = None  # error body to return with `status` (default: OpenAI-style error)


class FaultScript:
    """A thread-safe queue of scripted reactions, consumed one per chat request before normal answers."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()

    def add(
        self,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        content: str | None = None,
        body: dict[str, Any] | None = None,
        times: int = 1,
    ) -> FaultScript:
        """Queue a reaction `times` times; returns self so calls chain."""
        fault = Fault(status=status, headers=dict(headers or {}), delay=delay, content=content, body=body)
        with self._lock:
            self._queue.extend([fault] * times)
        return self

    def pop(self) -> Fault | None:
        """The next scripted reaction, or None when the script is used up."""
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        """Drop every queued reaction."""
        with self._lock:
            self._queue.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)


@dataclass(frozen=True)
class ReceivedRequest:
    """A chat request as the server saw it (the Authorization header is never kept)."""

    time: float  # time.time() on arrival
    body: Any  # decoded JSON body (None if it was not JSON)
    headers: dict[str, str]


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message or _REASONS.get(status, f"HTTP {status}."),
            "type": "simulated_fault",
            "param": None,
            "code": None,
        }
    }


@dataclass
class InFlight:
    """Chat requests being answered now, and the most at once since the last reset."""

    current: int = 0
    peak: int = 0

    def reset(self) -> None:
        self.peak = self.current


def build_app(
    model: SimulatedModel,
    faults: FaultScript | None = None,
    requests: list[ReceivedRequest] | None = None,
    api_key: str | None = None,
    in_flight: InFlight | None = None,
) -> Starlette:
    """A Starlette app serving /v1/chat/completions and /v1/models from `model`, `faults` first."""
    script = faults if faults is not None else FaultScript()
    received = requests if requests is not None else []
    flying = in_flight if in_flight is not None else InFlight()

    async def answer(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        received.append(ReceivedRequest(time.time(), body, headers))
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(_error_body(401), status_code=401)
        fault = script.pop()
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status is not None and fault.status != 200:
            return JSONResponse(fault.body or _error_body(fault.status), fault.status, headers=fault.headers)
        status, answer_headers, payload = model.respond(body, content=fault.content if fault else None)
        if status == 200 and model.latency and fault is None:
            await asyncio.sleep(model.latency)
        extra = fault.headers if fault is not None else {}
        return JSONResponse(payload, status_code=status, headers={**answer_headers, **extra})

    async def chat(request: Request) -> Response:
        flying.current += 1  # one event loop: no lock needed
        flying.peak = max(flying.peak, flying.current)
        try:
            return await answer(request)
        except (ClientDisconnect, asyncio.CancelledError):
            # The client gave up (its timeout) or the server is stopping: nobody waits for this answer, and
            # uvicorn would log the exception as an application error.
            return Response(status_code=499)
        finally:
            flying.current -= 1

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(model.models())

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"])]
    )
    app.state.model, app.state.faults, app.state.requests = model, script, received
    return app


@dataclass
class RunningServer:
    """A server started by run_server: where it listens and what it has seen."""

    base_url: str  # e.g. http://127.0.0.1:PORT/v1
    model: SimulatedModel
    faults: FaultScript
    requests: list[ReceivedRequest]
    in_flight: InFlight = field(default_factory=InFlight)

    def reset(self) -> None:
        """Forget queued faults, received requests and the in-flight peak (between tests)."""
        self.faults.clear()
        self.requests.clear()
        self.in_flight.reset()


def _config(app: Starlette, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", backlog=4096, **kwargs)


@contextmanager
def run_server(
    host: str = "127.0.0.1",
    port: int = 0,
    model: SimulatedModel | None = None,
    faults: FaultScript | None = None,
    api_key: str | None = None,
) -> Iterator[RunningServer]:
    """Run the app with uvicorn in a background thread; yields a RunningServer, stops on exit."""
    model = model if model is not None else SimulatedModel()
    faults = faults if faults is not None else FaultScript()
    received: list[ReceivedRequest] = []
    in_flight = InFlight()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here so the port is known before uvicorn starts
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_config(build_app(model, faults, received, api_key, in_flight)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mp-llm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"The simulated LLM server on {host}:{bound_port} did not start within 10 s.")
        time.sleep(0.002)
    bound_host = f"[{host}]" if ":" in host else host
    try:
        yield RunningServer(f"http://{bound_host}:{bound_port}/v1", model, faults, received, in_flight)
    finally:
        server.force_exit = True  # do not wait for requests still sleeping on a scripted delay
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()


def serve(
    host: str = "127.0.0.1", port: int = 8000, latency: float = 0.0, failure_rate: float = 0.0, seed: int = 0
) -> None:
    """Serve the simulated model until interrupted (blocking)."""
    model = SimulatedModel(latency=latency, failure_rate=failure_rate, seed=seed)
    print(
        f"Simulated OpenAI-compatible endpoint on http://{host}:{port}/v1 ({model!r}); set OPENAI_BASE_URL to use it.",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(_config(build_app(model), host=host, port=port)).run()
