"""The simulated model as a real OpenAI-compatible HTTP endpoint, for `mp-pipelines serve-model`.

`build_app` answers /v1/chat/completions and /v1/models from a `SimulatedModel`, and its Batch API
(/v1/files, /v1/batches: `simulated_batches.py`); its `before_answer`
hook lets a caller answer a chat request itself (the test suite's fault server scripts errors this
way). Latency is an async sleep, so one process holds thousands of concurrent requests without a
thread per request.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mp_pipelines.llm.simulated import SimulatedModel

# Sees each chat request and its decoded JSON body (None if not JSON) before the model does; a
# Response it returns is the answer, None lets the model answer.
BeforeAnswer = Callable[[Request, Any], Awaitable[Response | None]]


def build_app(model: SimulatedModel, *, before_answer: BeforeAnswer | None = None) -> Starlette:
    """A Starlette app serving /v1/chat/completions and /v1/models from `model`."""

    async def answer(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if before_answer is not None and (response := await before_answer(request, body)) is not None:
            return response
        status, headers, payload = model.respond(body)
        if status == 200 and model.latency:
            await asyncio.sleep(model.latency)
        return JSONResponse(payload, status_code=status, headers=headers)

    async def chat(request: Request) -> Response:
        try:
            return await answer(request)
        except (ClientDisconnect, asyncio.CancelledError):
            # The client gave up (its timeout) or the server is stopping: nobody waits for this answer, and
            # uvicorn would log the exception as an application error.
            return Response(status_code=499)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(model.models())

    async def batches(request: Request) -> Response:
        status, headers, payload = model.batches.route(request.method, request.url.path, await request.body(),
                                                       request.headers.get("content-type", ""))
        if isinstance(payload, bytes):
            return Response(payload, status_code=status, headers=headers)
        return JSONResponse(payload, status_code=status, headers=headers)

    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"]),
                Route("/v1/files{rest:path}", batches, methods=["GET", "POST"]),
                Route("/v1/batches{rest:path}", batches, methods=["GET", "POST"])]
    )


def server_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """Uvicorn settings for a busy loopback endpoint: quiet logs, no lifespan, a deep accept backlog."""
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", backlog=4096, **kwargs)


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
    uvicorn.Server(server_config(build_app(model), host=host, port=port)).run()
