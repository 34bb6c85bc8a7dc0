"""A loopback OpenAI-compatible server of the simulated model with scripted faults, for the tests.

Tests use it to drive the openai client over real HTTP (429s, 500s, slow answers, exact answer
texts, and transport faults: reset connections, held requests, malformed or cut-off bodies, empty
`choices`). It is `mp_pipelines.llm.serve.build_app` with a `before_answer` hook that checks the
key, logs the request and reacts to it, plus a count of chat requests in flight.

A `FaultScript` reacts to chat requests in order, then (with `failure_rate`) fails a seeded random
fraction of the rest with a random fault kind. `SimulatedModel.failure_rate` is the in-process
counterpart: it can only answer HTTP 500 and 429, as it has no connection to reset or cut.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mp_pipelines.llm.serve import build_app, server_config
from mp_pipelines.llm.simulated import SimulatedModel

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


SCRIPTED = "scripted"  # the kind of a plain `add(status=..., content=...)` reaction
# Fault kinds that are HTTP errors, answered as JSON: (status, headers); the other kinds are _ACTIONS below.
_HTTP_FAULTS: dict[str, tuple[int, dict[str, str]]] = {
    "rate_limit": (429, {"retry-after": "1"}),
    "rate_limit_no_retry_after": (429, {}),
    "server_error": (500, {}),
    "unavailable": (503, {}),
}
HOLD_LIMIT = 300.0  # seconds a read_timeout fault holds a request whose client never gives up
_MALFORMED_BODY = '{"id": "chatcmpl-fault", "object": "chat.completion", "choices": [{"index": 0, "message": '


@dataclass(frozen=True)
class Fault:
    """One scripted reaction: sleep `delay` seconds, then react as `kind` says.

    "scripted" answers `status` (with `body`) or a completion with `content`; FAULT_KINDS are HTTP
    errors (429 with and without Retry-After, 500, 503) and transport faults (see _ACTIONS).
    """

    status: int | None = None  # an error status to return instead of an answer
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sleep before reacting
    content: str | None = None  # exact answer text of a 200 completion (malformed_json: the raw body)
    body: dict[str, Any] | None = None  # error body to return with `status` (default: OpenAI-style error)
    kind: str = SCRIPTED  # "scripted" or one of FAULT_KINDS


def make_fault(
    kind: str = SCRIPTED,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    delay: float = 0.0,
    content: str | None = None,
    body: dict[str, Any] | None = None,
) -> Fault:
    """A Fault of `kind` ("scripted" or one of FAULT_KINDS); given fields override the kind's defaults."""
    if kind != SCRIPTED and kind not in FAULT_KINDS:
        raise ValueError(f"Fault kind {kind!r} is unknown; use {SCRIPTED!r} or one of {', '.join(FAULT_KINDS)}.")
    default_status, default_headers = _HTTP_FAULTS.get(kind, (None, {}))
    merged = {**default_headers, **{name.lower(): value for name, value in (headers or {}).items()}}
    return Fault(status if status is not None else default_status, merged, delay, content, body, kind)


class FaultScript:
    """A thread-safe queue of scripted reactions, consumed one per chat request before normal answers.

    With `failure_rate`, a request that finds the queue empty fails with that probability, with a
    fault drawn from `kinds` (names or Faults; default RANDOM_FAULT_KINDS); the draws come from one
    RNG seeded with `seed`, in request order.
    """

    def __init__(self, failure_rate: float = 0.0, seed: int = 0, kinds: Sequence[str | Fault] | None = None) -> None:
        kinds = RANDOM_FAULT_KINDS if kinds is None else kinds
        if not 0.0 <= failure_rate <= 1.0 or not kinds:
            raise ValueError("FaultScript needs 0 <= failure_rate <= 1 and at least one fault kind to draw from.")
        self.failure_rate = failure_rate
        self._random_faults = [kind if isinstance(kind, Fault) else make_fault(kind) for kind in kinds]
        self._rng = random.Random(seed)
        self._queue: deque[Fault] = deque()
        self._keyed: dict[str, deque[Fault]] = {}  # text in a request's messages → its reactions (add_for)
        self._lock = threading.Lock()

    def add(self, kind: str = SCRIPTED, *, times: int = 1, **fields: Any) -> FaultScript:
        """Queue a reaction `times` times (`fields`: make_fault's status, headers, delay, content, body);
        returns self so calls chain."""
        fault = make_fault(kind, **fields)
        with self._lock:
            self._queue.extend([fault] * times)
        return self

    def add_for(self, text: str, kind: str = SCRIPTED, *, times: int = 1, **fields: Any) -> FaultScript:
        """Queue a reaction `times` times for requests whose messages contain `text` (e.g. one item's prompt);
        they come before the general queue. Returns self."""
        fault = make_fault(kind, **fields)
        with self._lock:
            self._keyed.setdefault(text, deque()).extend([fault] * times)
        return self

    def pop_for(self, body: Any) -> Fault | None:
        """The next reaction queued with `add_for` for a text in this request's messages, else `pop()`."""
        if self._keyed:
            messages = json.dumps(body.get("messages", "") if isinstance(body, dict) else "", ensure_ascii=False)
            with self._lock:
                for text, queued in self._keyed.items():
                    if queued and text in messages:
                        return queued.popleft()
        return self.pop()

    def pop(self) -> Fault | None:
        """The next scripted reaction, else a random fault (at `failure_rate`), else None."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self.failure_rate and self._rng.random() < self.failure_rate:
                return self._rng.choice(self._random_faults)
            return None

    def clear(self) -> None:
        """Drop every queued reaction (random failures go on)."""
        with self._lock:
            self._queue.clear()
            self._keyed.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)


@dataclass(frozen=True)
class ReceivedRequest:
    """A chat request as the server saw it (the Authorization header is never kept)."""

    time: float  # time.time() on arrival
    body: Any  # decoded JSON body (None if it was not JSON)
    headers: dict[str, str]
    fault: str | None = None  # kind of the scripted or random reaction it got; None: the model answered
    peer: str = ""  # the client's "host:port": one per connection


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message or _REASONS.get(status, f"HTTP {status}."),
            "type": "simulated_fault",
            "param": None,
            "code": None,
        }
    }


def _transport(request: Request) -> asyncio.Transport:
    """The connection's asyncio transport, for faults that cut or reset it.

    Written against uvicorn 0.54: each of its HTTP protocols hands the app the bound `receive` of a
    RequestResponseCycle, which holds the connection's `transport`.
    """
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("Connection faults need the app served by uvicorn: the connection's transport is out of reach.")
    return transport


async def _disconnected(request: Request) -> Response:
    """Wait until the connection is gone; the returned response is never sent (uvicorn drops it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    return Response(status_code=499)


def _head(fault: Fault, content_type: str, framing: str) -> bytes:
    """A 200 status line and headers, written straight to the transport."""
    lines = ["HTTP/1.1 200 OK", f"content-type: {content_type}", framing, *(f"{k}: {v}" for k, v in fault.headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _sse_chunks(payload: dict[str, Any]) -> list[bytes]:
    """The completion as server-sent chat.completion.chunk events, one per word, in chunked framing."""
    words = payload["choices"][0]["message"]["content"].split(" ")
    events = []
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
        chunk = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
                 "model": payload["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        data = f"data: {json.dumps(chunk)}\n\n".encode()
        events.append(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    return events


async def _scripted(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """HTTP error `status` (with `body`), else the model's completion (with `content`, if given)."""
    if fault.status is not None and fault.status != 200:
        return JSONResponse(fault.body or _error_body(fault.status), fault.status, headers=fault.headers)
    status, answer_headers, payload = model.respond(body, content=fault.content)
    return JSONResponse(payload, status_code=status, headers={**answer_headers, **fault.headers})


async def _connection_reset(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """Reset the connection (TCP RST: linger 0, then abort) without a byte of response."""
    transport = _transport(request)
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return await _disconnected(request)


async def _read_timeout(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """Never answer: hold the request until the client gives up (at most HOLD_LIMIT seconds, then close)."""
    try:
        return await asyncio.wait_for(_disconnected(request), HOLD_LIMIT)
    except asyncio.TimeoutError:
        _transport(request).close()
        return Response(status_code=499)


async def _malformed_json(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """HTTP 200 labelled application/json whose body is not JSON (`content`, else the head of a completion)."""
    text = fault.content if fault.content is not None else _MALFORMED_BODY
    return Response(text, status_code=200, headers=fault.headers, media_type="application/json")


async def _empty_choices(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """HTTP 200 with a well-formed completion whose `choices` list is empty."""
    status, answer_headers, payload = model.respond(body, content="")
    if status == 200:
        payload = {**payload, "choices": []}
    return JSONResponse(payload, status_code=status, headers={**answer_headers, **fault.headers})


async def _cut_off(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """Start a 200 answer and close the connection halfway: mid-body, or mid-stream when `"stream": true`."""
    status, answer_headers, payload = model.respond(body, content=fault.content)
    if status != 200:
        return JSONResponse(payload, status_code=status, headers=answer_headers)
    transport = _transport(request)
    if body.get("stream"):
        events, head = _sse_chunks(payload), _head(fault, "text/event-stream", "transfer-encoding: chunked")
        transport.write(head + b"".join(events[: len(events) // 2 + 1]))  # no closing chunk, no `data: [DONE]`
    else:
        data = json.dumps(payload).encode()
        transport.write(_head(fault, "application/json", f"content-length: {len(data)}") + data[: len(data) // 2])
    transport.close()  # after the buffered bytes are out, without the rest of the body
    return await _disconnected(request)


async def _echo_authorization(request: Request, fault: Fault, model: SimulatedModel, body: Any) -> Response:
    """HTTP 400 whose error message repeats the request's Authorization header, as some gateways do."""
    message = f"Unsupported header Authorization: {request.headers.get('authorization', '')}"
    return JSONResponse(_error_body(400, message), 400, headers=fault.headers)


Reaction = Callable[[Request, Fault, SimulatedModel, Any], Awaitable[Response]]
_ACTIONS: dict[str, Reaction] = {
    "connection_reset": _connection_reset,
    "read_timeout": _read_timeout,
    "malformed_json": _malformed_json,
    "empty_choices": _empty_choices,
    "cut_off": _cut_off,
    "echo_authorization": _echo_authorization,
}
FAULT_KINDS = (*_HTTP_FAULTS, *_ACTIONS)
# A held request costs its client the whole timeout, so random failures leave read_timeout out; an echoed
# credential tests redaction, not resilience, so they leave echo_authorization out too.
RANDOM_FAULT_KINDS = tuple(kind for kind in FAULT_KINDS if kind not in ("read_timeout", "echo_authorization"))


@dataclass
class InFlight:
    """Chat requests being answered now, and the most at once since the last reset."""

    current: int = 0
    peak: int = 0

    def reset(self) -> None:
        self.peak = self.current


class _CountInFlight:
    """ASGI middleware counting chat requests from arrival until their answer is handed to the server."""

    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        self.in_flight.current += 1  # one event loop: no lock needed
        self.in_flight.peak = max(self.in_flight.peak, self.in_flight.current)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.current -= 1


def build_fault_app(
    model: SimulatedModel,
    faults: FaultScript | None = None,
    requests: list[ReceivedRequest] | None = None,
    api_key: str | None = None,
    in_flight: InFlight | None = None,
) -> ASGIApp:
    """The model's app (see build_app) checking `api_key`, logging to `requests` and reacting with `faults` first."""
    script = faults if faults is not None else FaultScript()
    received = requests if requests is not None else []

    async def react(request: Request, body: Any) -> Response | None:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            received.append(ReceivedRequest(time.time(), body, headers, peer=peer))
            return JSONResponse(_error_body(401), status_code=401)
        fault = script.pop_for(body)
        received.append(ReceivedRequest(time.time(), body, headers, fault.kind if fault else None, peer))
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        return await _ACTIONS.get(fault.kind, _scripted)(request, fault, model, body)

    return _CountInFlight(build_app(model, before_answer=react), in_flight if in_flight is not None else InFlight())


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


@contextmanager
def run_server(
    host: str = "127.0.0.1",
    port: int = 0,
    model: SimulatedModel | None = None,
    faults: FaultScript | None = None,
    api_key: str | None = None,
    tls: tuple[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Run the fault app with uvicorn in a background thread; yields a RunningServer, stops on exit.
    `tls` (certificate file, key file) serves HTTPS."""
    model = model if model is not None else SimulatedModel()
    faults = faults if faults is not None else FaultScript()
    received: list[ReceivedRequest] = []
    in_flight = InFlight()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here so the port is known before uvicorn starts
    bound_port = sock.getsockname()[1]
    certificate = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
    server = uvicorn.Server(server_config(build_fault_app(model, faults, received, api_key, in_flight), **certificate))
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
        scheme = "https" if tls else "http"
        yield RunningServer(f"{scheme}://{bound_host}:{bound_port}/v1", model, faults, received, in_flight)
    finally:
        server.force_exit = True  # do not wait for requests still sleeping on a scripted delay
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()
