"""One chat-completion call to an OpenAI-compatible endpoint (or the simulated model), with no Dagster.

Retry layering: in a run, request-level retries (connection errors, timeouts, 429 honouring Retry-After,
5xx, unusable 200s) belong to the call path's retry stage (`calls/retry.py`), and the clients of runs are
made with `max_retries=0`; a client used on its own keeps the openai client's `max_retries` (default 2).
This module never loops over a request itself. Step-level retries (the whole op again) belong to
Dagster's `RetryPolicy`; `LLMError.retryable` says which errors are worth one.

`LLMRequest.timeout` bounds the whole call, client retries included: httpx event hooks give every
attempt only the time left, stop retrying once it is spent and veto a Retry-After that would
overrun it. Async calls are also cut at the budget exactly; a sync call may overrun it by the one
backoff sleep the client takes before the hook can stop it. The same hooks count HTTP attempts, so
`LLMResult.attempts` is what went over the wire. The simulated provider is an httpx transport under
the same openai client, so it takes exactly this path.

Async calls use AsyncOpenAI clients of the running event loop (connections cannot cross loops), so
`acomplete` works from successive `asyncio.run` calls; a loop's clients are closed by `aclose()` or
when `asyncio.run` shuts that loop down. A loop spreads its calls over lanes (`lanes.py`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai

from mp_pipelines.llm import tls
from mp_pipelines.llm.headers import retry_after_seconds
from mp_pipelines.llm.lanes import Lanes, close_with_loop
from mp_pipelines.llm.provider import resolve_provider
from mp_pipelines.llm.redact import redact, split_credentials
from mp_pipelines.llm.simulated import SimulatedModel, SimulatedTransport
from mp_pipelines.llm.types import LLMError, LLMRequest, LLMResult, ResponseObserver

log = logging.getLogger(__name__)

SIMULATED_BASE_URL = "http://simulated.local/v1"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
STRUCTURED_OUTPUT_MODES = ("json_schema", "json_object", "none")


def public_url(url: str) -> str:
    """A URL without user:password, fit for messages."""
    return split_credentials(url).public_url


def describe_call(label: str, base_url: str) -> str:
    """The subject of an error sentence, e.g. "LLM call research[3] to http://host/v1"."""
    return f"LLM call {label} to {public_url(base_url)}" if label else f"LLM call to {public_url(base_url)}"


def parse_json_answer(text: str) -> Any:
    """Decode a JSON answer, tolerating surrounding ```json fences; raises ValueError."""
    stripped = text.strip()
    fenced = re.fullmatch(r"```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```", stripped, flags=re.DOTALL)
    return json.loads(fenced.group(1) if fenced else stripped)


@dataclass
class _Call:
    """Per-call state the httpx hooks read and update."""

    label: str
    base_url: str
    deadline: float  # time.monotonic() when the budget is spent
    max_retries: int
    attempts: int = 0
    last_status: int | None = None
    on_response: Callable[[int, Mapping[str, str]], None] | None = None  # e.g. a rate limiter adapting to 429


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("mp_llm_call", default=None)


def _before_send(request: httpx.Request) -> None:
    """Count the attempt and give it only the time left in the call's budget."""
    call = _CALL.get()
    if call is None:
        return
    remaining = call.deadline - time.monotonic()
    if remaining <= 0.001:
        raise openai.APITimeoutError(request=request)  # an OpenAIError: the openai client re-raises, no retry
    call.attempts += 1
    if call.attempts > 1:
        why = f"HTTP {call.last_status}" if call.last_status else "a timeout or connection error"
        log.info("Retrying LLM call %s to %s: attempt %d/%d after %s.", call.label or "(unlabelled)",
                 call.base_url, call.attempts, call.max_retries + 1, why)
    call.last_status = None
    timeout = request.extensions.get("timeout") or dict.fromkeys(("connect", "read", "write", "pool"))
    request.extensions["timeout"] = {k: remaining if v is None else min(v, remaining) for k, v in timeout.items()}


def _after_send(response: httpx.Response) -> None:
    """Remember the status for the retry log; veto a retry whose Retry-After would overrun the budget."""
    call = _CALL.get()
    if call is None:
        return
    call.last_status = response.status_code
    if call.on_response is not None:
        call.on_response(response.status_code, response.headers)
    wait = retry_after_seconds(response.headers)
    if wait is not None and response.status_code >= 400 and wait >= call.deadline - time.monotonic():
        response.headers["x-should-retry"] = "false"  # honoured by the openai client's retry decision


def _connection_limits() -> Any:
    """The SDK's pool limits, but keep every connection alive: with more calls in flight than kept-alive
    connections, each answer closes one and the next call opens a new one (a connect per call)."""
    limits = openai.DEFAULT_CONNECTION_LIMITS  # openai's own defaults (max 1000 connections)
    return type(limits)(max_connections=limits.max_connections, max_keepalive_connections=limits.max_connections)


def _tries(attempts: int) -> str:
    """"after 1 attempt", "after 3 attempts"."""
    return f"after {attempts} attempt{'s' if attempts != 1 else ''}"


def _never_connected(exc: openai.APIConnectionError) -> bool:
    """Whether the connection was never made (refused, unresolvable), rather than lost mid-answer.

    By class name: the transport error is httpx's or httpx2's (openai 3.x), whose classes are unrelated.
    """
    cause = exc.__cause__
    return cause is None or any(cls.__name__ == "ConnectError" for cls in type(cause).__mro__)


def _certificate_refused(exc: openai.APIConnectionError) -> str | None:
    """The reason, when the connection failed because the server's certificate did not verify (a setting to fix, not
    a failure to retry)."""
    link: BaseException | None = exc.__cause__
    for _ in range(10):
        if link is None:
            return None
        if isinstance(link, ssl.SSLCertVerificationError):
            return link.verify_message or str(link)
        if "CERTIFICATE_VERIFY_FAILED" in str(link):  # the transport's own error, carrying the OpenSSL text
            return str(link)
        link = link.__cause__ or link.__context__
    return None


def _transport_failure(exc: openai.APIConnectionError) -> str:
    """E.g. "ReadError: [Errno 104] Connection reset by peer": the transport error, with the first message down
    its chain (async transports wrap the OS error in message-less layers)."""
    link: BaseException | None = exc.__cause__
    for _ in range(10):
        if link is None or str(link):
            break
        link = link.__cause__ or link.__context__
    return f"{type(exc.__cause__).__name__}: {link or 'no detail'}"


async def _abefore_send(request: httpx.Request) -> None:
    _before_send(request)


async def _aafter_send(response: httpx.Response) -> None:
    _after_send(response)


class LLMClient:
    """Chat completions over the openai client, for a real endpoint or the simulated model."""

    def __init__(self, *, provider: str = "auto", api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 60.0, max_retries: int = 2, structured_output: str = "json_schema",
                 simulated_latency: float = 0.0, simulated_failure_rate: float = 0.0, simulated_seed: int = 0,
                 default_headers: Mapping[str, str] | None = None) -> None:
        if structured_output not in STRUCTURED_OUTPUT_MODES:
            raise ValueError(f"structured_output {structured_output!r} is unknown; use {STRUCTURED_OUTPUT_MODES}.")
        if timeout <= 0 or max_retries < 0:
            raise ValueError("LLMClient needs timeout > 0 seconds and max_retries >= 0.")
        self.provider_name = resolve_provider(provider, api_key, base_url)
        self.timeout, self.max_retries, self.structured_output = timeout, max_retries, structured_output
        self._simulated = SimulatedModel(simulated_latency, simulated_failure_rate, simulated_seed)
        if self.provider_name == "simulated":
            api_key, base_url = "simulated", SIMULATED_BASE_URL
        self._api_key = api_key
        self._headers = dict(default_headers or {})  # sent with every request (a named provider's `headers`)
        # user:password in the URL is sent as HTTP Basic auth and kept out of the URL, so no request URL, log
        # line or error the SDK or httpx makes can show it.
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._credentials = split_credentials(url)
        self.base_url = self._credentials.public_url
        self._secret: str | None = None  # the key actually sent; redacted from every message
        self._lock = threading.RLock()  # _sync_client builds its arguments under it
        self._sync: openai.OpenAI | None = None
        self._async: dict[asyncio.AbstractEventLoop, tuple[Lanes, AsyncGenerator[None, None]]] = {}
        self._ssl_context: Any = None  # the process's shared context (tls.py), for every client of this LLMClient
        if self.provider_name != "simulated":
            tls.prepare(openai.DefaultAsyncHttpxClient)  # ready by the first call

    def __repr__(self) -> str:
        return f"LLMClient(provider={self.provider_name!r}, base_url={public_url(self.base_url)!r})"

    def _client_args(self, asynchronous: bool) -> dict[str, Any]:
        """Keyword arguments for OpenAI/AsyncOpenAI; raises LLMError when no key can be found."""
        key = self._api_key or os.environ.get("OPENAI_API_KEY")
        if not key and self.base_url != DEFAULT_BASE_URL:
            key = "unused"  # local OpenAI-compatible servers (vLLM, Ollama, ...) accept any key
        if not key:
            raise LLMError(f"No API key for the LLM endpoint {self.base_url}: set OPENAI_API_KEY or use the "
                           "'simulated' provider.", kind="authentication")
        self._secret = key
        hooks = {"request": [_abefore_send if asynchronous else _before_send],
                 "response": [_aafter_send if asynchronous else _after_send]}
        transport = SimulatedTransport(self._simulated) if self.provider_name == "simulated" else None
        # The SDK's own default client class (httpx, or httpx2 from openai 3.x) keeps its tuned pool and defaults.
        factory = openai.DefaultAsyncHttpxClient if asynchronous else openai.DefaultHttpxClient
        tls = {} if transport is not None else {"verify": self._tls_context(factory)}
        http = factory(transport=transport, timeout=self.timeout, event_hooks=hooks, trust_env=transport is None,
                       limits=_connection_limits(), **tls)
        args = {"api_key": key, "base_url": self.base_url, "max_retries": self.max_retries, "timeout": self.timeout,
                "http_client": http}
        if self._headers:
            args["default_headers"] = dict(self._headers)
        if self._credentials.present:  # replaces the Bearer key, as httpx does for a URL with user:password
            args["default_headers"] = {**self._headers, "Authorization": f"Basic {self._credentials.basic_token()}"}
        return args

    def _sync_client(self) -> openai.OpenAI:
        with self._lock:
            if self._sync is None:
                self._sync = openai.OpenAI(**self._client_args(asynchronous=False))
            return self._sync

    def _tls_context(self, factory: type) -> Any:
        """The context the clients verify the endpoint's certificate with: the process's shared one (tls.py)."""
        with self._lock:
            if self._ssl_context is None:
                self._ssl_context = tls.verifying_context(factory)
            return self._ssl_context

    async def _async_lanes(self) -> Lanes:
        """The running event loop's own clients."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for stale in [other for other in self._async if other.is_closed()]:
                del self._async[stale]  # connections of a finished loop can be neither used nor awaited
            fresh = loop not in self._async
            if fresh:
                lanes = Lanes(lambda: openai.AsyncOpenAI(**self._client_args(asynchronous=True)))
                self._async[loop] = (lanes, close_with_loop(lanes))
            lanes, closer = self._async[loop]
        if fresh:
            await closer.__anext__()  # parks the closer; asyncio.run's shutdown_asyncgens() finishes it
        return lanes

    def _create_args(self, request: LLMRequest, budget: float) -> dict[str, Any]:
        """Arguments of chat.completions.create for a request."""
        if not request.messages or budget <= 0:
            raise LLMError(f"{describe_call(request.label, self.base_url)} needs messages and a timeout > 0 s.",
                           kind="bad_request")
        args: dict[str, Any] = {"model": request.model, "messages": request.messages, "timeout": budget}
        if request.temperature is not None:
            args["temperature"] = request.temperature
        if request.max_tokens is not None:
            args["max_tokens"] = request.max_tokens
        schema = request.json_schema
        if schema is not None and self.structured_output == "json_schema":
            args["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": False}}
        elif (request.json_output or schema is not None) and self.structured_output != "none":
            args["response_format"] = {"type": "json_object"}
            if not any("json" in str(m.get("content", "")).lower() for m in request.messages):
                # OpenAI refuses json_object mode unless some message mentions JSON.
                args["messages"] = [*request.messages, {"role": "system", "content": "Answer with a JSON object."}]
        return args

    def _start(self, request: LLMRequest, on_response: ResponseObserver | None) -> tuple[_Call, float, dict[str, Any]]:
        budget = request.timeout if request.timeout is not None else self.timeout
        args = self._create_args(request, budget)
        call = _Call(request.label, self.base_url, time.monotonic() + budget, self.max_retries, on_response=on_response)
        return call, budget, args

    def complete(self, request: LLMRequest, on_response: ResponseObserver | None = None) -> LLMResult:
        """Send one request and wait for its result; raises LLMError. `on_response` sees every HTTP response."""
        call, budget, args = self._start(request, on_response)
        token, started = _CALL.set(call), time.monotonic()
        try:
            completion = self._sync_client().chat.completions.with_raw_response.create(**args).parse()
        except (openai.OpenAIError, json.JSONDecodeError) as exc:  # JSONDecodeError: a 200 body that is not JSON
            raise self._error(exc, request, call, budget) from None
        finally:
            _CALL.reset(token)
        return self._result(completion, request, call, time.monotonic() - started)

    async def acomplete(self, request: LLMRequest, on_response: ResponseObserver | None = None) -> LLMResult:
        """Send one request on the running event loop; raises LLMError. `on_response` sees every HTTP response."""
        call, budget, args = self._start(request, on_response)
        lanes = await self._async_lanes()
        lane = lanes.take()
        token, started = _CALL.set(call), time.monotonic()
        try:
            create = lanes.clients[lane].chat.completions.with_raw_response.create(**args)
            async with asyncio.timeout(budget):  # also bounds sleeps between retries; no extra task per call
                completion = (await create).parse()
        except (openai.OpenAIError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            raise self._error(exc, request, call, budget) from None
        finally:
            _CALL.reset(token)
            lanes.release(lane)
        return self._result(completion, request, call, time.monotonic() - started)

    def _result(self, completion: Any, request: LLMRequest, call: _Call, latency: float) -> LLMResult:
        if not hasattr(completion, "choices"):  # e.g. a proxy's HTML page: the SDK hands back the body as a string
            excerpt = self._redact(" ".join(str(completion).split())[:200])
            raise LLMError(f"{describe_call(request.label, call.base_url)} got HTTP 200 that is not a chat completion "
                           f"({_tries(call.attempts)}); the body began {excerpt!r}: check OPENAI_BASE_URL.",
                           kind="server_error", attempts=call.attempts)
        if not completion.choices:  # never an empty answer: the endpoint sent none
            raise LLMError(f"{describe_call(request.label, call.base_url)} got HTTP 200 with an empty `choices` list "
                           f"({_tries(call.attempts)}): the endpoint returned no answer; retrying the call may help.",
                           kind="server_error", attempts=call.attempts)
        choice = completion.choices[0]
        text = choice.message.content or ""
        usage = completion.usage
        result = LLMResult(text=text, parsed=None, model=completion.model or request.model, provider=self.provider_name,
                           prompt_tokens=usage.prompt_tokens if usage else 0,
                           completion_tokens=usage.completion_tokens if usage else 0, latency_s=latency,
                           finish_reason=choice.finish_reason, attempts=max(call.attempts, 1))
        if request.json_output or request.json_schema is not None:
            result = replace(result, parsed=self._validated(result, request))
        return result

    def _validated(self, result: LLMResult, request: LLMRequest) -> Any:
        """Decode the answer and check it against the request's schema; raises LLMError(invalid_output)."""
        text = result.text
        where, excerpt = describe_call(request.label, self.base_url), self._redact(" ".join(text.split())[:200])
        try:
            parsed = parse_json_answer(text)
        except ValueError as exc:
            raise LLMError(f"{where} returned an answer that is not valid JSON ({exc}); the answer began "
                           f"{excerpt!r}.", kind="invalid_output", attempts=result.attempts, result=result,
                           detail=f"it is not valid JSON ({exc})") from None
        if request.json_schema is None:
            return parsed
        import jsonschema  # here, not at import: ~0.2 s that runs without a JSON schema never need

        validator = _validator(request.json_schema)
        if isinstance(validator, jsonschema.SchemaError):
            raise LLMError(f"{where} has an invalid JSON schema: {validator.message}.", kind="bad_request") from None
        error = jsonschema.exceptions.best_match(validator.iter_errors(parsed))
        if error is not None:
            raise LLMError(f"{where} returned JSON that does not match the schema ({error.message} at "
                           f"{error.json_path}); the answer began {excerpt!r}.", kind="invalid_output",
                           attempts=result.attempts, result=result,
                           detail=f"it does not match the JSON schema: {error.message} at {error.json_path}")
        return parsed

    def _error(self, exc: BaseException, request: LLMRequest, call: _Call, budget: float) -> LLMError:
        """Map an openai exception to an LLMError with one clear sentence (never the API key)."""
        n, status = call.attempts, getattr(exc, "status_code", None)
        tries = _tries(n)
        if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
            kind = "timeout"
            what = f"got no answer within {budget:g} s ({tries}): raise the timeout or check that the endpoint responds"
        elif isinstance(exc, openai.APIConnectionError) and (reason := _certificate_refused(exc)):
            kind = "tls"
            what = (f"could not verify the server's TLS certificate ({self._redact(reason)[:200]}): set SSL_CERT_FILE "
                    "to the certificate of the authority that signed it (or fix the endpoint's certificate)")
        elif isinstance(exc, openai.APIConnectionError) and _never_connected(exc):
            kind, what = "connection", f"could not connect ({tries}): check OPENAI_BASE_URL and that the server runs"
        elif isinstance(exc, openai.APIConnectionError):
            cause = self._redact(_transport_failure(exc))[:200]
            kind = "connection"
            what = f"lost the connection before the answer was complete ({cause}; {tries}): the endpoint or a proxy dropped it"
        elif isinstance(exc, json.JSONDecodeError):
            body = self._redact(" ".join(exc.doc.split()))[:120]
            kind = "server_error"
            what = (f"got HTTP 200 with a body that is not JSON ({exc.msg}; {tries}): the endpoint or a proxy is "
                    f"misbehaving; the body began {body!r}")
        elif isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            kind, what = "authentication", f"was refused with HTTP {status}: check OPENAI_API_KEY for this endpoint"
        elif isinstance(exc, openai.RateLimitError):
            kind = "rate_limit"
            what = f"was rate-limited (HTTP 429, {tries}): lower the concurrency or request rate, or raise max_retries"
        elif isinstance(exc, openai.APIStatusError) and status is not None and status >= 500:
            kind, what = "server_error", f"failed with HTTP {status} ({tries}): the endpoint is failing; try later"
        elif isinstance(exc, openai.APIStatusError):
            kind = "bad_request"
            what = (f"was rejected with HTTP {status} ({self._redact(exc.message)[:300]}): check the model name "
                    "and request parameters")
        else:
            kind, what = "server_error", f"failed ({self._redact(f'{type(exc).__name__}: {exc}')[:300]})"
        error = LLMError(f"{describe_call(request.label, call.base_url)} {what}.", kind=kind, status_code=status,
                         attempts=n)
        response = getattr(exc, "response", None)
        if status is not None and response is not None:
            error.retry_after = retry_after_seconds(response.headers)
        return error

    # -- the Batch API (llm/batches.py) sends requests and reads answers another way than chat.completions --
    async def async_openai(self) -> openai.AsyncOpenAI:
        """An AsyncOpenAI client of the running event loop (files and batches go through it)."""
        lanes = await self._async_lanes()
        lane = lanes.take()
        lanes.release(lane)
        return lanes.clients[lane]

    def openai_client(self) -> openai.OpenAI:
        """The blocking OpenAI client (a batch cancelled while the process exits)."""
        return self._sync_client()

    def request_body(self, request: LLMRequest) -> dict[str, Any]:
        """The chat.completions body `request` makes, as a Batch API input line carries it."""
        args = self._create_args(request, request.timeout or self.timeout)
        args.pop("timeout")
        return args

    def result_from_body(self, body: Any, request: LLMRequest) -> LLMResult:
        """The result of a chat completion body received as a Batch API output line (validated like an online
        answer); raises LLMError."""
        call = _Call(request.label, self.base_url, time.monotonic(), self.max_retries, attempts=1)
        try:
            completion = openai.types.chat.ChatCompletion.model_validate(body)
        except ValueError:
            completion = body  # reported by _result as not a chat completion
        return self._result(completion, request, call, 0.0)

    def _redact(self, text: str) -> str:
        """Text from the endpoint without the API key, the URL's password or any authorization value."""
        return redact(text, (self._secret or "", *self._credentials.secrets()))

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sync client and forget async clients (each is closed with its loop, or by aclose())."""
        with self._lock:
            sync, self._sync = self._sync, None
            self._async.clear()
        if sync is not None:
            sync.close()

    async def aclose(self) -> None:
        """Close the running loop's async client now."""
        with self._lock:
            entry = self._async.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()


_VALIDATORS: dict[int, tuple[Any, Any]] = {}  # id(schema) -> (schema, its checked validator or SchemaError)
_VALIDATORS_KEPT = 256


def _validator(schema: Any) -> Any:
    """The validator of a JSON schema, checked once per schema object (a task's items share one), or the
    SchemaError that checking it raised."""
    import jsonschema

    cached = _VALIDATORS.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    validator_cls = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
        found: Any = validator_cls(schema)
    except jsonschema.SchemaError as exc:
        found = exc
    if len(_VALIDATORS) >= _VALIDATORS_KEPT:
        _VALIDATORS.clear()
    _VALIDATORS[id(schema)] = (schema, found)  # holding the schema keeps its id from being reused
    return found
