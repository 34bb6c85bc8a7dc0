"""What one model call is made of: the request, its result, its error, and the model that answers it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

ResponseObserver = Callable[[int, Mapping[str, str]], None]  # (HTTP status, headers) of every attempt
RETRYABLE_KINDS = frozenset({"rate_limit", "timeout", "server_error", "connection", "invalid_output", "circuit_open"})


@dataclass(frozen=True)
class LLMRequest:
    """One chat call: messages, model and the output contract."""

    messages: list[dict[str, str]]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    json_output: bool = False  # the task wants JSON
    json_schema: dict | None = None  # JSON schema the answer must satisfy (implies json_output)
    timeout: float | None = None  # seconds for this call, client retries included (None: client default)
    label: str = ""  # e.g. "research[3]", for log and error messages


@dataclass(frozen=True)
class LLMResult:
    """The answer of one call and what it cost."""

    text: str
    parsed: Any  # decoded and validated JSON when json_output, else None
    model: str  # model the endpoint reports
    provider: str  # "openai" or "simulated"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # seconds, retries included
    finish_reason: str | None
    attempts: int  # HTTP attempts made (1 = no retry)
    cost_usd: float = 0.0  # set by the call path from the price table
    cached: bool = False  # taken from the response cache: no call was made

    def as_cached(self) -> LLMResult:
        """This answer given again without a call: no latency, no HTTP attempt."""
        return replace(self, latency_s=0.0, attempts=0, cached=True)


class LLMError(Exception):
    """A failed LLM call; `kind` classifies it and `retryable` says whether a step retry may help."""

    def __init__(self, message: str, *, kind: str, status_code: int | None = None, attempts: int = 0,
                 result: LLMResult | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.status_code, self.attempts = kind, status_code, attempts
        self.retryable = kind in RETRYABLE_KINDS
        # An answer that arrived but was unusable (invalid_output): its raw text and token usage still count,
        # and `detail` says what is wrong with it in words fit to send back to the model.
        self.result, self.detail = result, detail
        self.usage: Any = None  # what every call that led to this error spent (a calls.usage.Usage, set there)
        self.retry_after: float | None = None  # seconds the failed response asked to wait (Retry-After), if any

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = functools.partial(LLMError, kind=self.kind, status_code=self.status_code, attempts=self.attempts,
                                    result=self.result, detail=self.detail)
        return rebuild, (str(self),), {"usage": self.usage, "retry_after": self.retry_after}

    def __repr__(self) -> str:
        return f"LLMError(kind={self.kind!r}, retryable={self.retryable}, message={str(self)!r})"


@dataclass(frozen=True)
class LimitSettings:
    """Caps on the calls to one model; None means no cap."""

    max_in_flight: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def merged(self, other: LimitSettings | None) -> LimitSettings:
        """Field-wise: `other`'s values where set, else ours."""
        if other is None:
            return self
        return LimitSettings(*(o if o is not None else s for s, o in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int | float | None, ...]:
        return (self.max_in_flight, self.requests_per_minute, self.tokens_per_minute)

    @property
    def unlimited(self) -> bool:
        return all(value is None for value in self.astuple())


@runtime_checkable
class ChatModel(Protocol):
    """What the call path needs of a model: `LLMResource` is one, a test double can be another."""

    default_model: str  # the model of requests that name none
    timeout: float  # seconds one call may take, client retries included

    async def acomplete(self, request: LLMRequest, on_response: ResponseObserver | None = None) -> LLMResult:
        """One chat call on the running event loop; raises LLMError."""
        ...

    def endpoint_key(self) -> str:
        """Which endpoint calls go to (never the key): calls to one endpoint and model share limiters and cache."""
        ...

    def limit_settings(self) -> LimitSettings:
        """The caps of one process on the calls to one model."""
        ...
