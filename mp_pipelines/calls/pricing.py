"""Stage: what a call costs, from a price table per model (the shipped defaults, overridable by a YAML file).

Prices are US dollars per million tokens. The shipped table holds OpenAI's list prices for common
models (standard tier, as published in 2025); a file named by `MP_PRICES_FILE` adds models or
replaces prices, e.g.

    gpt-4o-mini: {input: 0.15, output: 0.60}
    my-local-llama: {input: 0, output: 0}

A dated or preview snapshot of a listed model (`gpt-4o-2024-08-06`, `gpt-4.1-mini-latest`,
`o1-preview`) takes that model's price; any other name (`o1-pro`, `gpt-5-pro`: different prices) is
unlisted. An unlisted model costs 0 and is logged once, so spend is never silently invented.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMError, LLMResult

log = logging.getLogger(__name__)

PRICES_ENV = "MP_PRICES_FILE"
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


@dataclass(frozen=True)
class PriceTable:
    """Model → (input, output) USD per million tokens."""

    prices: Mapping[str, tuple[float, float]]

    def price_of(self, model: str) -> tuple[float, float] | None:
        """The model's price, by exact name or as a snapshot of a listed name; None when unlisted."""
        if model in self.prices:
            return self.prices[model]
        found = _SNAPSHOT.fullmatch(model)
        return self.prices.get(found.group(1)) if found else None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """US dollars for one call (0 for an unlisted model, logged once per model)."""
        price = self.price_of(model)
        if price is None:
            _warn_unpriced(model)
            return 0.0
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


@lru_cache(maxsize=None)
def _warn_unpriced(model: str) -> None:
    log.warning("No price for model %r: its calls count as $0. Add it to the file named by %s.", model, PRICES_ENV)


def parse_prices(data: Any, source: str) -> dict[str, tuple[float, float]]:
    """Prices from a YAML document: {model: {input: USD/1M, output: USD/1M}}; PriceFileError when malformed."""
    if not isinstance(data, dict):
        raise PriceFileError(f"{source}: expected a mapping of model name to {{input, output}}, got {type(data).__name__}")
    prices = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise PriceFileError(f"{source}: model {model!r} needs exactly the keys input and output "
                                 f"(USD per million tokens), got {entry!r}")
        values = []
        for key in ("input", "output"):
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PriceFileError(f"{source}: model {model!r} field {key} must be a number ≥ 0, got {value!r}")
            values.append(float(value))
        prices[str(model)] = (values[0], values[1])
    return prices


def load_prices(path: str | os.PathLike[str] | None = None) -> PriceTable:
    """The shipped prices, overridden by `path` (default: the file named by MP_PRICES_FILE, if any)."""
    path = path or os.environ.get(PRICES_ENV) or None
    prices = dict(DEFAULT_PRICES)
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PriceFileError(f"{path}: cannot read the price file ({exc})") from None
        prices.update(parse_prices(data, str(path)))
    return PriceTable(prices)


_TABLES: dict[str | None, PriceTable] = {}


def current_prices() -> PriceTable:
    """The price table for this process's MP_PRICES_FILE (read once per file name)."""
    path = os.environ.get(PRICES_ENV) or None
    if path not in _TABLES:
        _TABLES[path] = load_prices(path)
    return _TABLES[path]


class Pricing:
    """The answer's cost from the price table, and its usage (an unusable answer's too: it was paid for)."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        try:
            answer = await proceed(call)
        except LLMError as exc:
            if exc.result is not None:
                exc.result = priced(exc.result)
            raise
        result = priced(answer.result)
        return Answer(result, Usage.of_result(result))


def priced(result: LLMResult) -> LLMResult:
    """The result with its cost from the price table."""
    return replace(result, cost_usd=current_prices().cost(result.model, result.prompt_tokens, result.completion_tokens))
