"""Offline, deterministic stand-in for an OpenAI-compatible chat endpoint.

`SimulatedModel.respond` turns a chat.completions request body into an HTTP status, headers and a
JSON body; `SimulatedTransport` serves it behind the openai client's own HTTP stack, so retries,
timeouts and error mapping run on every simulated call exactly as against a real server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import sys
import threading
import time
from types import ModuleType
from typing import Any

import httpx

from mp_pipelines.llm.simulated_batches import SimulatedBatches, is_batch_path

SIMULATED_TAG = "[simulated]"
_DEFAULT_ITEMS = 3
# How much of a prompt an answer quotes: whole up to these lengths, else its head and tail. Prompts of one task
# differ in what was rendered into them (an item, an input), which sits well inside these bounds in all but long
# prompts, so offline answers differ per item and show which item they answer.
TEXT_QUOTE_CHARS = 600
JSON_QUOTE_CHARS = 160


def _tokens(text: str) -> int:
    """Rough token count: one token per four characters, at least one."""
    return max(1, math.ceil(len(text) / 4))


def _content_text(content: Any) -> str:
    """Text of a message content, whether a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    """The last user message's text (or the last message's, if no user spoke)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return _content_text(messages[-1].get("content")) if messages else ""


def _excerpt(text: str, limit: int = 80) -> str:
    """A one-line excerpt of about `limit` characters: the head and the tail, where prompts tend to differ."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    head = limit * 2 // 3
    return f"{flat[:head].rstrip()} … {flat[head - limit + 3 :].lstrip()}"


def _item_count(text: str) -> int:
    """Default array length: the first integer 1..20 in the prompt, else 3."""
    for match in re.finditer(r"\d+", text):
        if 1 <= int(match.group()) <= 20:
            return int(match.group())
    return _DEFAULT_ITEMS


def _error(message: str, kind: str) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _SchemaFaker:
    """Builds a value satisfying a JSON schema, deterministically from a seeded RNG."""

    def __init__(self, root: dict[str, Any], rng: random.Random, prompt: str) -> None:
        self.root, self.rng, self.count = root, rng, _item_count(prompt)
        self.topic = _excerpt(prompt, JSON_QUOTE_CHARS)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#"):
            return schema
        target: Any = self.root
        for part in ref.lstrip("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")] if part else target
        return self._resolve({**target, **{k: v for k, v in schema.items() if k != "$ref"}})

    def value(self, schema: Any, name: str = "value", depth: int = 0) -> Any:
        """A value for `schema`; `name` is the property it fills, used in generated strings."""
        if not isinstance(schema, dict) or depth > 12:
            return f"simulated {name}"
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.value({**schema, key: None, **schema[key][0]}, name, depth + 1)
        if schema.get("allOf"):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part)
                merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            return self.value(merged, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        return getattr(self, f"_{kind}", self._string)(schema, name, depth)

    def _object(self, schema: dict[str, Any], name: str, depth: int) -> dict[str, Any]:
        props = schema.get("properties") or {}
        names = list(props) + [r for r in schema.get("required", []) if r not in props]
        index = re.search(r" [\d.]+$", name)  # an array item's number, so sibling items read differently
        suffix = index.group() if index else ""
        return {key: self.value(props.get(key, {}), key + suffix, depth + 1) for key in names}

    def _array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        count = int(min(max(self.count, schema.get("minItems", 0)), schema.get("maxItems", math.inf)))
        prefix, items = schema.get("prefixItems") or [], schema.get("items", {})
        index = re.search(r" [\d.]+$", name)
        base, number = (name[: index.start()], index.group()[1:] + ".") if index else (name, "")
        item_name = base[:-1] if base.endswith("s") and len(base) > 1 else f"{base} item"
        values: list[Any] = []
        for _ in range(count * 20):
            if len(values) == count:
                break
            i = len(values)
            value = self.value(prefix[i] if i < len(prefix) else items, f"{item_name} {number}{i + 1}", depth + 1)
            if not schema.get("uniqueItems") or value not in values:
                values.append(value)
        return values

    def _string(self, schema: dict[str, Any], name: str, depth: int) -> str:
        fmt = schema.get("format")
        if fmt in ("date", "date-time", "time", "email", "uri", "uuid"):
            stamp = self.rng.randrange(10**8)
            return {
                "date": f"2024-01-{stamp % 28 + 1:02d}",
                "date-time": f"2024-01-{stamp % 28 + 1:02d}T12:00:00Z",
                "time": f"12:{stamp % 60:02d}:00",
                "email": f"user{stamp}@example.com",
                "uri": f"https://example.com/simulated/{stamp}",
                "uuid": f"{stamp:08x}-0000-4000-8000-{stamp:012x}",
            }[fmt]
        text = f"{SIMULATED_TAG} {name} about {self.topic}"
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        text = text.ljust(low, ".")
        return text if high is None else text[:high]

    def _integer(self, schema: dict[str, Any], name: str, depth: int) -> int:
        low = schema.get("minimum", -math.inf)
        if "exclusiveMinimum" in schema:
            low = max(low, math.floor(schema["exclusiveMinimum"]) + 1)
        high = schema.get("maximum", math.inf)
        if "exclusiveMaximum" in schema:
            high = min(high, math.ceil(schema["exclusiveMaximum"]) - 1)
        low = math.ceil(low) if low > -math.inf else (0 if high >= 0 else high - 100)
        high = math.floor(high) if high < math.inf else low + 100
        return self.rng.randint(low, max(low, high))

    def _number(self, schema: dict[str, Any], name: str, depth: int) -> float:
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        low = (0.0 if high is None or high > 0 else high - 100.0) if low is None else low
        high = low + 100.0 if high is None else high
        value = min(max(round(self.rng.uniform(low, high), 2), low), high)
        if value in (low, high) and ("exclusiveMinimum" in schema or "exclusiveMaximum" in schema):
            value = (low + high) / 2
        return value

    def _boolean(self, schema: dict[str, Any], name: str, depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, schema: dict[str, Any], name: str, depth: int) -> None:
        return None


class SimulatedModel:
    """A deterministic fake chat model; `failure_rate` injects 500s and 429s from a seeded RNG."""

    def __init__(self, latency: float = 0.0, failure_rate: float = 0.0, seed: int = 0) -> None:
        if latency < 0 or not 0.0 <= failure_rate <= 1.0:
            raise ValueError("SimulatedModel needs latency >= 0 and 0 <= failure_rate <= 1.")
        self.latency, self.failure_rate, self.seed = latency, failure_rate, seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.batches = SimulatedBatches(self, seed=seed)  # its Batch API: files and batches

    def __repr__(self) -> str:
        return f"SimulatedModel(latency={self.latency}, failure_rate={self.failure_rate}, seed={self.seed})"

    def _injected_failure(self) -> tuple[int, dict[str, str], dict[str, Any]] | None:
        """With probability failure_rate, a 500 or a 429 (Retry-After: 0) instead of an answer."""
        if self.failure_rate <= 0:
            return None
        with self._lock:
            if self._rng.random() >= self.failure_rate:
                return None
            rate_limited = self._rng.random() < 0.5
        if rate_limited:
            # retry-after-ms lets the openai client retry at once; it treats "Retry-After: 0" as unset.
            headers = {"retry-after": "0", "retry-after-ms": "1"}
            return 429, headers, _error("Simulated rate limit (failure_rate).", "rate_limit_exceeded")
        return 500, {}, _error("Simulated server error (failure_rate).", "server_error")

    def models(self) -> dict[str, Any]:
        """The /v1/models listing."""
        return {"object": "list", "data": [{"id": "simulated", "object": "model", "created": 0, "owned_by": "mp"}]}

    def respond(self, body: Any, content: str | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Answer one chat.completions request body: (status, headers, JSON body); `content` scripts the text."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(body.get("model"), str):
            message = "A chat request needs 'model' and a non-empty 'messages' list."
            return 400, {}, _error(message, "invalid_request_error")
        failure = self._injected_failure() if content is None else None
        if failure is not None:
            return failure
        return 200, {"x-simulated": "true"}, self.completion(body, content)

    def completion(self, body: dict[str, Any], content: str | None = None) -> dict[str, Any]:
        """The chat.completion object for a valid request; `content` overrides the answer text."""
        messages, model = body["messages"], body["model"]
        canonical = {k: body.get(k) for k in ("messages", "model", "temperature", "max_tokens", "response_format")}
        digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()
        finish = "stop"
        if content is None:
            content, finish = self._answer(body, messages, random.Random(int(digest[:16], 16)), digest)
        prompt_chars = "".join(_content_text(m.get("content")) for m in messages)
        return {
            "id": f"chatcmpl-sim-{digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "simulated",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": _tokens(prompt_chars),
                "completion_tokens": _tokens(content),
                "total_tokens": _tokens(prompt_chars) + _tokens(content),
            },
        }

    def _answer(
        self, body: dict[str, Any], messages: list[dict[str, Any]], rng: random.Random, digest: str
    ) -> tuple[str, str]:
        """Answer text and finish reason for a request."""
        prompt = _last_user_text(messages)
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
            return json.dumps(_SchemaFaker(schema, rng, prompt).value(schema, "answer")), "stop"
        if fmt.get("type") == "json_object":
            quoted = _excerpt(prompt, TEXT_QUOTE_CHARS)
            answer = {"simulated": True, "answer": f"{SIMULATED_TAG} answer to: {quoted}", "id": digest[:8]}
            return json.dumps(answer), "stop"
        text = f"{SIMULATED_TAG} Response to: {_excerpt(prompt, TEXT_QUOTE_CHARS)} (#{digest[:8]})"
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit > 0 and _tokens(text) > limit:
            return text[: limit * 4], "length"
        return text, "stop"


def _http_module(request: httpx.Request) -> ModuleType:
    """httpx or httpx2, whichever built the request (openai 3.x clients use httpx2, its fork)."""
    return sys.modules[type(request).__module__.partition(".")[0]]


class SimulatedTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """An httpx (or httpx2) transport, sync and async, answering from a SimulatedModel with its latency."""

    def __init__(self, model: SimulatedModel) -> None:
        self.model = model

    def _route(self, request: httpx.Request, raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        path = request.url.path.rstrip("/")
        if is_batch_path(path):
            return self.model.batches.route(request.method, path, raw, request.headers.get("content-type", ""))
        if request.method == "POST" and path.endswith("/chat/completions"):
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                return 400, {}, _error("The request body is not valid JSON.", "invalid_request_error")
            return self.model.respond(body)
        if request.method == "GET" and path.endswith("/models"):
            return 200, {}, self.model.models()
        return 404, {}, _error(f"No simulated route for {request.method} {path}.", "not_found")

    def _wait(self, request: httpx.Request, status: int) -> tuple[float, bool]:
        """How long to sleep, and whether the request's read timeout runs out first."""
        latency = self.model.latency if status == 200 else 0.0
        read = (request.extensions.get("timeout") or {}).get("read")
        return (read, True) if read is not None and latency > read else (latency, False)

    @staticmethod
    def _reply(request: httpx.Request, result: tuple[int, dict[str, str], dict[str, Any]], timed_out: bool) -> Any:
        http = _http_module(request)
        if timed_out:
            raise http.ReadTimeout("The simulated model took longer than the read timeout.", request=request)
        status, headers, body = result
        if isinstance(body, bytes):  # a Batch API file's content
            return http.Response(status, headers=headers, content=body, request=request)
        return http.Response(status, headers=headers, json=body, request=request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Answer synchronously, sleeping the model's latency (or the read timeout, then raising ReadTimeout)."""
        result = self._route(request, request.read())
        delay, timed_out = self._wait(request, result[0])
        if delay:
            time.sleep(delay)
        return self._reply(request, result, timed_out)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Answer asynchronously, awaiting the model's latency (or the read timeout, then raising ReadTimeout)."""
        result = self._route(request, await request.aread())
        delay, timed_out = self._wait(request, result[0])
        if delay:
            await asyncio.sleep(delay)
        return self._reply(request, result, timed_out)
