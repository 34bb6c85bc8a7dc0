"""Size limits on what a workflow reads: input values, table files, spec files and rendered prompts.

Each limit has a default and an environment variable that raises or lowers it. The variable is read
each time the limit is checked, so a long-running code location or a test picks up a change at once.
(Rate and concurrency limits of LLM calls are another matter: see `calls/limits.py`.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SizeLimitError(ValueError):
    """A value, file or prompt is larger than its limit; the message names the limit's variable."""


@dataclass(frozen=True)
class SizeLimit:
    """One size limit: its environment variable, its default and the unit sizes are counted in."""

    env: str
    default: int
    unit: str  # "characters" or "bytes"

    def value(self) -> int:
        """The limit now: the environment variable when set, else the default; ValueError when it is no count."""
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        try:
            limit = int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"{self.env}={raw!r} is not a whole number of {self.unit}") from None
        if limit < 1:
            raise ValueError(f"{self.env}={raw!r} must be at least 1 ({self.unit})")
        return limit

    def check(self, size: int, what: str) -> None:
        """Raise SizeLimitError saying `what` is `size` units, the limit and how to raise it, when it is too big."""
        limit = self.value()
        if size > limit:
            raise SizeLimitError(f"{what} is {size:,} {self.unit}, more than the limit {limit:,} ({self.env}); "
                                 f"set {self.env} to allow more")


MAX_INPUT_CHARS = SizeLimit("MP_MAX_INPUT_CHARS", 1_000_000, "characters")  # one input value (lists: as JSON)
MAX_TABLE_BYTES = SizeLimit("MP_MAX_TABLE_BYTES", 100_000_000, "bytes")  # a table file, or a folder's text files
MAX_PROMPT_CHARS = SizeLimit("MP_MAX_PROMPT_CHARS", 400_000, "characters")  # one rendered prompt or system message
MAX_SPEC_BYTES = SizeLimit("MP_MAX_SPEC_BYTES", 1_000_000, "bytes")  # one workflow YAML file
