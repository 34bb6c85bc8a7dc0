"""Which endpoint a task's `model:` names: `name` is the run's LLM resource; `provider/name` is the
workflow's (or MP_PROVIDERS_FILE's) provider `provider`, when it declares one; any other `x/y` is a model id
(vLLM's `meta-llama/...`).

A provider's client (and its connection pool) is made once per process and configuration, and reused by
every run, as the LLM resource's is. Its key is read from the environment variable it names, when its
first call is made; it never enters a spec, a log line, metadata or an error.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from mp_pipelines.llm.named import ProviderModel, ProviderSettings
from mp_pipelines.llm.types import ChatModel, LimitSettings
from mp_pipelines.spec.models import ProviderSpec

_LOCK = threading.Lock()
_MODELS: dict[ProviderSettings, ProviderModel] = {}


def provider_settings(name: str, spec: ProviderSpec, timeout: float) -> ProviderSettings:
    limits = spec.limits
    caps = LimitSettings(**limits.model_dump()) if limits is not None else LimitSettings()
    return ProviderSettings(name, spec.base_url, spec.api_key_env, tuple(sorted(spec.headers.items())), caps, timeout)


def provider_model(settings: ProviderSettings) -> ProviderModel:
    """The process's model of one provider configuration."""
    with _LOCK:
        found = _MODELS.get(settings)
        if found is None:
            found = _MODELS[settings] = ProviderModel(settings)
        return found


class ModelRouter:
    """`model` or `provider/model` → (the ChatModel that serves it, the model id sent to it)."""

    def __init__(self, default: ChatModel, providers: Mapping[str, ProviderSpec]) -> None:
        self.default = default
        self.providers = dict(providers)

    def split(self, ref: str) -> tuple[str | None, str]:
        """(provider, model id): the provider only when `ref` is `provider/model` and it is declared."""
        name, slash, rest = ref.partition("/")
        if slash and rest and name in self.providers:
            return name, rest
        return None, ref

    def route(self, ref: str) -> tuple[ChatModel, str]:
        name, model_id = self.split(ref)
        if name is None:
            return self.default, model_id
        return provider_model(provider_settings(name, self.providers[name], self.default.timeout)), model_id
