"""Which provider calls go to: an OpenAI-compatible endpoint, or the offline simulated model."""

from __future__ import annotations

import os

PROVIDERS = ("auto", "openai", "simulated")


def resolve_provider(provider: str, api_key: str | None, base_url: str | None) -> str:
    """The provider "auto" stands for: openai when an API key or base URL is given, else simulated."""
    if provider not in PROVIDERS:
        raise ValueError(f"LLM provider {provider!r} is unknown; use 'auto', 'openai' or 'simulated'.")
    if provider == "auto":
        return "openai" if (api_key or base_url) else "simulated"
    return provider


def provider_from_env() -> str:
    """The provider runs will use, from the environment the LLM resource reads (MP_LLM_PROVIDER, OPENAI_*)."""
    return resolve_provider(os.environ.get("MP_LLM_PROVIDER") or "auto", os.environ.get("OPENAI_API_KEY"),
                            os.environ.get("OPENAI_BASE_URL"))
