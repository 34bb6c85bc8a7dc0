"""What an answer is stored under (its request's content address, or a run family's key for one call) and as."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mp_pipelines.llm.types import LLMRequest, LLMResult


def request_key(request: LLMRequest, endpoint: str) -> str:
    """The content address of a request: what was asked, of which endpoint and model, for which output."""
    content = {"endpoint": endpoint, "model": request.model, "messages": request.messages,
               "temperature": request.temperature, "max_tokens": request.max_tokens,
               "json": request.json_output, "schema": request.json_schema}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def checkpoint_key(key: str, label: str) -> str:
    """A run family's key for one call: the same request for two items are two answers."""
    return hashlib.sha256(f"{label}\0{key}".encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One answer to store."""

    scope: str
    key: str
    workflow: str
    task: str
    result: LLMResult


KEPT_FIELDS = ("text", "parsed", "model", "provider", "prompt_tokens", "completion_tokens", "finish_reason")


def encode(result: LLMResult) -> str:
    return json.dumps({name: getattr(result, name) for name in KEPT_FIELDS}, ensure_ascii=False, default=str)


def decode(answer: str, cost_usd: float) -> LLMResult:
    data = json.loads(answer)
    return LLMResult(**data, latency_s=0.0, attempts=0, cost_usd=cost_usd).as_cached()
