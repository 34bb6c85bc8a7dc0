"""A named provider of a workflow (`providers:`): an OpenAI-compatible endpoint with its own base URL, key
variable, headers and limits, served by its own LLMClient.

The key is read from the environment variable the provider names at each call (a changed key makes a
new client); a variable that is not set fails the call with a message naming the provider and the
variable, never a value. The client makes no request-level retries of its own: the call path's retry stage does.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from mp_pipelines.llm.client import LLMClient
from mp_pipelines.llm.types import LimitSettings, LLMError, LLMRequest, LLMResult, ResponseObserver


@dataclass(frozen=True)
class ProviderSettings:
    """One provider's configuration (hashable: one client per configuration and process)."""

    name: str
    base_url: str
    api_key_env: str | None
    headers: tuple[tuple[str, str], ...]
    limits: LimitSettings
    timeout: float


class ProviderModel:
    """The ChatModel of one named provider."""

    default_model = ""  # a provider's calls always name their model

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.timeout = settings.timeout
        self._client: LLMClient | None = None
        self._key: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProviderModel({self.settings.name!r}, {self.settings.base_url!r})"

    def client(self) -> LLMClient:
        """The provider's client; LLMError(authentication) when its key variable is not set."""
        variable, key = self.settings.api_key_env, None
        if variable is not None:
            key = os.environ.get(variable)
            if not key:
                raise LLMError(f"provider {self.settings.name!r} reads its API key from the environment "
                               f"variable {variable}, which is not set: set it where the run executes",
                               kind="authentication")
        with self._lock:
            if self._client is None or key != self._key:  # a rotated key takes a new client
                self._key = key
                self._client = LLMClient(provider="openai", api_key=key or "unused", base_url=self.settings.base_url,
                                         timeout=self.settings.timeout, max_retries=0,
                                         default_headers=dict(self.settings.headers))
            return self._client

    async def acomplete(self, request: LLMRequest, on_response: ResponseObserver | None = None) -> LLMResult:
        return await self.client().acomplete(request, on_response)

    def endpoint_key(self) -> str:
        return f"{self.settings.name}:{self.settings.base_url.rstrip('/')}"

    def limit_settings(self) -> LimitSettings:
        return self.settings.limits

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
