"""The OpenAI Batch API through the official client: upload a JSONL file, create a batch, poll it, read its files.

No caching, money or waiting policy here (that is `calls/batch.py`): one method per HTTP request, each mapping the
client's errors to an LLMError. An endpoint that has no Batch API (vLLM and Ollama answer 404 or 405 on /v1/files
and /v1/batches) raises `BatchUnsupported`, saying so.
"""

from __future__ import annotations

import json
from typing import Any

import openai

from mp_pipelines.llm.client import LLMClient, public_url
from mp_pipelines.llm.types import LLMError, LLMRequest, LLMResult

CHAT_URL = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
TRANSFER_SECONDS = 600.0  # an upload or download of a file of up to 200 MB
NO_BATCH_API = frozenset({404, 405, 501})  # what servers without the Batch API answer on its routes


class BatchUnsupported(LLMError):
    """The endpoint has no Batch API (never retried)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="batch_unsupported")

    def __reduce__(self) -> tuple[Any, ...]:
        return BatchUnsupported, (str(self),)


class BatchAPI:
    """Files and batches of the endpoint an LLMClient talks to."""

    def __init__(self, client: LLMClient) -> None:
        self.client = client

    @property
    def base_url(self) -> str:
        return public_url(self.client.base_url)

    def line(self, custom_id: str, request: LLMRequest) -> bytes:
        """One JSONL input line for `request`."""
        body = self.client.request_body(request)
        return (json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body},
                           ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def result(self, body: Any, request: LLMRequest) -> LLMResult:
        """An output line's chat completion as a validated result; LLMError (invalid_output too) otherwise."""
        return self.client.result_from_body(body, request)

    async def upload(self, data: bytes, filename: str) -> str:
        """Upload a JSONL input file (purpose `batch`); its file id."""
        client = await self.client.async_openai()
        file = await self._send("upload a batch input file to /v1/files",
                                client.files.create(file=(filename, data, "application/jsonl"), purpose="batch",
                                                    timeout=TRANSFER_SECONDS))
        return file.id

    async def create(self, input_file_id: str, metadata: dict[str, str]) -> Any:
        """Create a batch of chat completions from an uploaded file."""
        client = await self.client.async_openai()
        return await self._send("create a batch on /v1/batches", client.batches.create(
            input_file_id=input_file_id, endpoint=CHAT_URL, completion_window=COMPLETION_WINDOW, metadata=metadata))

    async def retrieve(self, batch_id: str) -> Any:
        client = await self.client.async_openai()
        return await self._send(f"read batch {batch_id}", client.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> Any:
        client = await self.client.async_openai()
        return await self._send(f"cancel batch {batch_id}", client.batches.cancel(batch_id))

    def cancel_now(self, batch_id: str, timeout: float) -> None:
        """Cancel a batch with a blocking request (for a process on its way out, whose event loop cannot connect)."""
        try:
            self.client.openai_client().batches.cancel(batch_id, timeout=timeout)
        except openai.OpenAIError as exc:
            raise LLMError(f"Batch API: could not cancel batch {batch_id} at {self.base_url}: "
                           f"{self.client._redact(str(exc))[:300]}", kind="server_error") from None  # noqa: SLF001

    async def content(self, file_id: str) -> bytes:
        """The bytes of an output or error file."""
        client = await self.client.async_openai()
        response = await self._send(f"download batch file {file_id}", client.files.content(file_id, timeout=TRANSFER_SECONDS))
        return response.content

    async def _send(self, what: str, request: Any) -> Any:
        try:
            return await request
        except openai.APIStatusError as exc:
            status = exc.status_code
            message = self.client._redact(str(exc.message))[:300]  # noqa: SLF001 - the client's own redaction
            if status in NO_BATCH_API and ("/v1/files" in what or "/v1/batches" in what):
                raise BatchUnsupported(
                    f"the endpoint {self.base_url} has no Batch API (HTTP {status} when trying to {what}): "
                    "servers such as vLLM and Ollama do not offer it; run with --mode online, or set "
                    "`batch_fallback: online` to make such calls online") from None
            kind = ("authentication" if status in (401, 403) else "rate_limit" if status == 429
                    else "server_error" if status >= 500 else "bad_request")
            raise LLMError(f"Batch API: could not {what} at {self.base_url}: HTTP {status} ({message})", kind=kind,
                           status_code=status) from None
        except openai.APIConnectionError as exc:
            raise LLMError(f"Batch API: could not {what} at {self.base_url}: {type(exc).__name__} "
                           "(check OPENAI_BASE_URL and that the server runs)", kind="connection") from None
