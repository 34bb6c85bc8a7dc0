"""The Dagster resource every prompt op calls: configuration in, an LLMClient out.

The client (and its HTTP connections) is built in `setup_for_execution` and closed in
`teardown_after_execution`; used outside a run, the resource builds it on first use. Request-level
retries belong to the call path's retry stage (`calls/retry.py`; the client's own `max_retries` is 0 by
default); step-level retries belong to the op's `dg.RetryPolicy`, guided by `LLMError.retryable`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, get_args

import dagster as dg
import openai
from pydantic import Field, PrivateAttr

from mp_pipelines.llm.batches import BatchAPI
from mp_pipelines.llm.client import LLMClient
from mp_pipelines.llm.provider import resolve_provider
from mp_pipelines.llm.tls import prepare as prepare_tls
from mp_pipelines.llm.types import LimitSettings, LLMRequest, LLMResult, ResponseObserver
from mp_pipelines.spec.size_limits import SettingError

_BUILD_LOCK = threading.Lock()  # guards lazy client creation when the resource is used outside a run
Provider = Literal["auto", "openai", "simulated"]


class SettingsError(SettingError):
    """An MP_* environment variable holds a value the LLM resource cannot use; the message names it and what it
    may be."""


class LLMResource(dg.ConfigurableResource):
    """Chat completions from an OpenAI-compatible endpoint, or the offline simulated model."""

    provider: Provider = Field(
        default="auto",
        description="'openai' for an OpenAI-compatible endpoint, 'simulated' for the offline deterministic model, "
        "'auto' for openai when an API key or base URL is set and simulated otherwise.",
    )
    api_key: str | None = Field(
        default=None, repr=False, description="API key of the endpoint; set it from dg.EnvVar('OPENAI_API_KEY')."
    )
    base_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible endpoint (vLLM, Ollama, a gateway); "
        "set it from dg.EnvVar('OPENAI_BASE_URL'). Empty means api.openai.com.",
    )
    default_model: str = Field(default="gpt-4o-mini", description="Model used when a task names none.")
    timeout: float = Field(default=60.0, description="Seconds one call may take, the client's retries included.")
    max_retries: int = Field(
        default=0,
        description="Extra retries inside the openai client, for each attempt of the call path (default none: "
        "the call path's retry stage retries 429, 5xx, timeouts and lost connections with its retry budget, "
        "docs/reliability.md); step-level retries are the op's RetryPolicy.",
    )
    structured_output: Literal["json_schema", "json_object", "none"] = Field(
        default="json_schema",
        description="How JSON tasks ask for JSON: a response_format with the task's schema, plain JSON mode, "
        "or nothing (for endpoints without response_format); answers are validated either way.",
    )
    simulated_latency: float = Field(default=0.0, description="Seconds the simulated model takes per answer.")
    simulated_failure_rate: float = Field(
        default=0.0, description="Probability (0..1) that the simulated model answers HTTP 500 or 429."
    )
    simulated_seed: int = Field(default=0, description="Seed of the simulated model's failure draws.")
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Most calls to one model in flight at once in one process (none: no cap)."
    )
    requests_per_minute: float | None = Field(
        default=None, gt=0, description="Most calls to one model per minute in one process (none: no cap)."
    )
    tokens_per_minute: float | None = Field(
        default=None, gt=0, description="Most prompt+completion tokens to one model per minute in one process."
    )

    mode: Literal["auto", "batch", "online"] = Field(
        default="auto",
        description="'batch' sends the run's calls through the endpoint's Batch API (half the price, answers within "
        "24 h), 'online' calls at once; 'auto': each task's `mode:` decides (default online).",
    )

    _client: LLMClient | None = PrivateAttr(default=None)

    def _build_client(self) -> LLMClient:
        return LLMClient(
            provider=self.provider,
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            structured_output=self.structured_output,
            simulated_latency=self.simulated_latency,
            simulated_failure_rate=self.simulated_failure_rate,
            simulated_seed=self.simulated_seed,
        )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Build the client for this run."""
        self._client = self._build_client()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Close the client's connections at the end of the run."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def provider_name(self) -> str:
        """The resolved provider: "openai" or "simulated"."""
        return resolve_provider(self.provider, self.api_key, self.base_url)

    def get_client(self) -> LLMClient:
        """The client, built on first use when the resource runs outside Dagster's setup."""
        if self._client is None:
            with _BUILD_LOCK:
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def _with_default_model(self, request: LLMRequest) -> LLMRequest:
        return request if request.model else replace(request, model=self.default_model)

    def complete(self, request: LLMRequest, on_response: ResponseObserver | None = None) -> LLMResult:
        """One chat call (blocking); raises LLMError."""
        return self.get_client().complete(self._with_default_model(request), on_response)

    async def acomplete(self, request: LLMRequest, on_response: ResponseObserver | None = None) -> LLMResult:
        """One chat call on the running event loop; raises LLMError."""
        return await self.get_client().acomplete(self._with_default_model(request), on_response)

    def batch_api(self) -> BatchAPI:
        """Files and batches of this endpoint (the Batch API)."""
        return BatchAPI(self.get_client())

    def limit_settings(self) -> LimitSettings:
        """This process's caps per model (also the defaults of a workflow's `limits`)."""
        return LimitSettings(self.max_in_flight, self.requests_per_minute, self.tokens_per_minute)

    def endpoint_key(self) -> str:
        """Which endpoint calls go to, for keying per-model limiters (never contains the key)."""
        return f"{self.provider_name}:{self.get_client().base_url}"


# variable → (resource field, how to read it, whether a value is allowed, what is allowed)
_NUMBERS: dict[str, tuple[str, Callable[[str], float], Callable[[float], bool], str]] = {
    "MP_SIMULATED_LATENCY": ("simulated_latency", float, lambda v: v >= 0, "a number of seconds, 0 or more"),
    "MP_SIMULATED_FAILURE_RATE": ("simulated_failure_rate", float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "MP_MAX_IN_FLIGHT": ("max_in_flight", int, lambda v: v >= 1, "a whole number, 1 or more"),
    "MP_REQUESTS_PER_MINUTE": ("requests_per_minute", float, lambda v: v > 0, "a number greater than 0"),
    "MP_TOKENS_PER_MINUTE": ("tokens_per_minute", float, lambda v: v > 0, "a number greater than 0"),
}


def _number_setting(variable: str) -> float:
    """The value of a numeric MP_* variable; SettingsError naming it and what is allowed when it is unusable."""
    _, read, allowed, wanted = _NUMBERS[variable]
    text = os.environ[variable]
    try:
        value = read(text.strip())
    except ValueError:
        value = math.nan  # allowed by no rule: nan compares false
    if not math.isfinite(value) or not allowed(value):
        raise SettingsError(f"{variable}={text!r} is not valid: it must be {wanted}.")
    return value


def build_llm_resource() -> LLMResource:
    """The LLM resource from the environment; with no key and no base URL it is the simulated model.

    SettingsError names an MP_* variable whose value cannot be used, and what it may be.
    """
    resource = LLMResource(**_settings_from_env())
    if resource.provider_name != "simulated":  # a run builds this with its job: the TLS context is ready by its calls
        prepare_tls(openai.DefaultAsyncHttpxClient)
    return resource


def llm_run_config(mode: str) -> dict[str, object]:
    """`resources.llm` run config for a run in `mode` (batch or online), with the settings the environment gives.

    Dagster replaces a resource's configured values as a whole when run config sets any field, so a run config
    of only `mode` would lose the endpoint; secrets appear as `{"env": NAME}`, never as values."""
    config = {name: ({"env": value.env_var_name} if isinstance(value, dg.EnvVar) else value)
              for name, value in _settings_from_env().items()}
    return {"config": {**config, "mode": mode}}


def _settings_from_env() -> dict[str, object]:
    settings: dict[str, object] = {}
    if os.environ.get("OPENAI_API_KEY"):
        settings["api_key"] = dg.EnvVar("OPENAI_API_KEY")
    if os.environ.get("OPENAI_BASE_URL"):
        settings["base_url"] = dg.EnvVar("OPENAI_BASE_URL")
    if os.environ.get("MP_LLM_PROVIDER"):
        provider, choices = os.environ["MP_LLM_PROVIDER"], get_args(Provider)
        if provider.strip() not in choices:
            raise SettingsError(f"MP_LLM_PROVIDER={provider!r} is not valid: it must be one of {', '.join(choices)}.")
        settings["provider"] = provider.strip()
    if os.environ.get("MP_DEFAULT_MODEL"):
        settings["default_model"] = os.environ["MP_DEFAULT_MODEL"]
    for variable, (field, *_) in _NUMBERS.items():
        if os.environ.get(variable):
            settings[field] = _number_setting(variable)
    return settings
