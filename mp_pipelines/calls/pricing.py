"""Stage: what a call costs, from a price table per model (the shipped defaults, overridable by a YAML file).

Prices are US dollars per million tokens. The shipped table holds OpenAI's list prices for common
models (standard tier, as published in 2025); a file named by `MP_PRICES_FILE` adds models or
replaces prices, e.g.

    gpt-4o-mini: {input: 0.15, output: 0.60}
    my-local-llama: {input: 0, output: 0}
    my-gateway-model: {input: 1.0, output: 4.0, batch_input: 0.8, batch_output: 3.2}

Calls sent through the Batch API (`mode: batch`) cost the model's batch prices: half its list prices unless
the file gives `batch_input` and `batch_output`.

A dated or preview snapshot of a listed model (`gpt-4o-2024-08-06`, `gpt-4.1-mini-latest`,
`o1-preview`) takes that model's price, and so does a provider-prefixed name (`openai/gpt-4o`, as
gateways name models); any other name (`o1-pro`, `gpt-5-pro`: different prices) is unlisted.

An answer is priced by the model the endpoint reports; when that name is not listed, by the model the
call asked for (logged once per name), since an endpoint's own name for a model must not make its calls
free under a cost budget. A model with no price at all costs 0 and is logged once, so spend is never
silently invented; under a cost budget it is refused before the first call (`unpriced_under_budget`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from mp_pipelines.calls.budget import usd
from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMError, LLMResult
from mp_pipelines.spec.size_limits import SettingError

log = logging.getLogger(__name__)

PRICES_ENV = "MP_PRICES_FILE"
BATCH_DISCOUNT = 0.5  # the Batch API's price as a share of the online list price (OpenAI: half)
_SNAPSHOT = re.compile(r"(.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4}|latest|preview(?:-\d{4}-\d{2}-\d{2})?)")

# USD per 1M tokens: (input, output).
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.00, 60.00),
    "o1-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}


class PriceFileError(ValueError):
    """The price file cannot be read or has a bad entry; the message names the file and the model."""


class PriceSettingError(PriceFileError, SettingError):
    """The file MP_PRICES_FILE names cannot be read or has a bad entry; the message names the variable too."""


@dataclass(frozen=True)
class PriceTable:
    """Model → (input, output) USD per million tokens."""

    prices: Mapping[str, tuple[float, float]]
    batch_prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # those the price file gives

    def _listed(self, model: str) -> str | None:
        """The listed name `model` is, by exact name or as a snapshot of it."""
        if model in self.prices:
            return model
        found = _SNAPSHOT.fullmatch(model)
        return found.group(1) if found and found.group(1) in self.prices else None

    def listed_name(self, model: str) -> str | None:
        """The listed name whose price `model` takes: itself, a snapshot's, or that of its name without a provider
        prefix; None when unlisted."""
        return self._listed(model) or self._listed(model.rpartition("/")[2])

    def price_of(self, model: str) -> tuple[float, float] | None:
        """The model's price (see `listed_name`); None when unlisted."""
        name = self.listed_name(model)
        return None if name is None else self.prices[name]

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, requested: str | None = None) -> float:
        """US dollars for one call answered as `model` that asked for `requested`.

        `model`'s own price, else the requested model's, else that of `model` without its provider prefix
        (logged once per name); 0 when none is listed (logged once per model)."""
        own = self._listed(model)
        name = own or (self.listed_name(requested) if requested else None) or self.listed_name(model)
        if name is None:
            _warn_unpriced(model)
            return 0.0
        if own is None:
            _warn_priced_as(model, name)
        price = self.prices[name]
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


    def batch_cost(self, model: str, prompt_tokens: int, completion_tokens: int, requested: str | None = None) -> float:
        """US dollars for one call sent through the Batch API: the model's batch prices, else half its list prices."""
        own = self._listed(model)
        name = own or (self.listed_name(requested) if requested else None) or self.listed_name(model)
        if name is None:
            _warn_unpriced(model)
            return 0.0
        price = self.batch_prices.get(name)
        if price is None:
            online = self.prices[name]
            price = (online[0] * BATCH_DISCOUNT, online[1] * BATCH_DISCOUNT)
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


@lru_cache(maxsize=None)
def _warn_unpriced(model: str) -> None:
    log.warning("No price for model %r: its calls count as $0. Add it to the file named by %s.", model, PRICES_ENV)


@lru_cache(maxsize=None)
def _warn_priced_as(model: str, listed: str) -> None:
    log.warning("The endpoint answered as model %r, which has no price of its own: its calls are priced as %r. "
                "Add %r to the file named by %s to price it otherwise.", model, listed, model, PRICES_ENV)


def unpriced_under_budget(model: str, max_cost_usd: float | None) -> str | None:
    """Why a cost budget cannot hold for calls to `model` (it has no price), or None."""
    if max_cost_usd is None or current_prices().price_of(model) is not None:
        return None
    return (f"model {model!r} has no price, so the budget's max_cost_usd of {usd(max_cost_usd)} cannot be enforced; "
            f"add it to the file named by {PRICES_ENV} ({model}: {{input: USD, output: USD}}, per million tokens) "
            "or remove max_cost_usd")


def parse_prices(data: Any, source: str) -> dict[str, tuple[float, float]]:
    """Prices from a YAML document: {model: {input: USD/1M, output: USD/1M}}; PriceFileError when malformed."""
    return parse_price_file(data, source)[0]


_BATCH_KEYS = frozenset({"batch_input", "batch_output"})


def parse_price_file(data: Any, source: str) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """(online prices, batch prices) from a YAML document: {model: {input, output[, batch_input, batch_output]}}
    in USD per million tokens; PriceFileError when malformed."""
    if not isinstance(data, dict):
        raise PriceFileError(f"{source}: expected a mapping of model name to {{input, output}}, got {type(data).__name__}")
    prices, batch_prices = {}, {}
    for model, entry in data.items():
        keys = set(entry) if isinstance(entry, dict) else set()
        if not isinstance(entry, dict) or keys - _BATCH_KEYS != {"input", "output"} or keys & _BATCH_KEYS not in (
                set(), _BATCH_KEYS):
            raise PriceFileError(f"{source}: model {model!r} needs exactly the keys input and output (USD per million "
                                 f"tokens), optionally with both batch_input and batch_output, got {entry!r}")
        values = []
        for key in ("input", "output", *(("batch_input", "batch_output") if keys & _BATCH_KEYS else ())):
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PriceFileError(f"{source}: model {model!r} field {key} must be a number ≥ 0, got {value!r}")
            values.append(float(value))
        prices[str(model)] = (values[0], values[1])
        if len(values) == 4:
            batch_prices[str(model)] = (values[2], values[3])
    return prices, batch_prices


def load_prices(path: str | os.PathLike[str] | None = None) -> PriceTable:
    """The shipped prices, overridden by `path` (default: the file named by MP_PRICES_FILE, if any)."""
    path = path or os.environ.get(PRICES_ENV) or None
    prices = dict(DEFAULT_PRICES)
    batch_prices: dict[str, tuple[float, float]] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.MarkedYAMLError as exc:
            where = f" on line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
            raise PriceFileError(f"{path}: the price file is not valid YAML{where} ({exc.problem})") from None
        except (OSError, yaml.YAMLError) as exc:
            raise PriceFileError(f"{path}: cannot read the price file ({exc})") from None
        online, batch_prices = parse_price_file(data, str(path))
        prices.update(online)
    return PriceTable(prices, batch_prices)


_TABLES: dict[str | None, PriceTable] = {}


def current_prices() -> PriceTable:
    """The price table for this process's MP_PRICES_FILE (read once per file name)."""
    path = os.environ.get(PRICES_ENV) or None
    if path not in _TABLES:
        try:
            _TABLES[path] = load_prices(path)
        except PriceFileError as exc:
            reason = " ".join(str(exc).split()).removeprefix(f"{path}: ")
            raise PriceSettingError(f"{PRICES_ENV}={path!r} is not a usable price file: {reason}; set it to a YAML "
                                    "file of model: {input: USD, output: USD} (per million tokens), or unset it for "
                                    "the shipped prices") from None
    return _TABLES[path]


class Pricing:
    """The answer's cost from the price table, and its usage (an unusable answer's too: it was paid for)."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        requested = call.request.model or call.model.default_model
        try:
            answer = await proceed(call)
        except LLMError as exc:
            if exc.result is not None:
                exc.result = priced(exc.result, requested)
            raise
        result = priced(answer.result, requested)
        return Answer(result, Usage.of_result(result))


def priced(result: LLMResult, requested: str | None = None) -> LLMResult:
    """The result with its cost from the price table (by `requested` when the reported model is unlisted)."""
    table = current_prices()
    return replace(result, cost_usd=table.cost(result.model, result.prompt_tokens, result.completion_tokens, requested))
