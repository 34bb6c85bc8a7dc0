"""Size limits on what a workflow reads: input values, tables (bytes, rows, cells), spec files and rendered prompts.

Each limit has a default and an environment variable that raises or lowers it. The variable is read
each time the limit is checked, so a long-running code location or a test picks up a change at once.
(Rate and concurrency limits of LLM calls are another matter: see `calls/limits.py`.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingError(ValueError):
    """An MP_* environment variable holds a value that cannot be used; the message names the variable, its value
    (unless it may hold a secret) and what it may be. The CLI refuses a run with it before the run starts (exit 2,
    `cli/settings_check.py`); inside a step it fails the step with the same message."""


class SizeLimitError(ValueError):
    """A value, file or prompt is larger than its limit; the message names the limit's variable."""


@dataclass(frozen=True)
class SizeLimit:
    """One size limit: its environment variable, its default and the unit sizes are counted in."""

    env: str
    default: int
    unit: str  # "characters" or "bytes"

    def value(self) -> int:
        """The limit now: the environment variable when set, else the default; SettingError when it is no count."""
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        try:
            limit = int(raw.replace("_", ""))
        except ValueError:
            raise SettingError(f"{self.env}={raw!r} is not a whole number; {self._wanted()}") from None
        if limit < 1:
            raise SettingError(f"{self.env}={raw!r} is less than 1; {self._wanted()}")
        return limit

    def _wanted(self) -> str:
        return f"set a whole number of {self.unit}, 1 or more, or unset it for the default ({self.default:,})"

    def check(self, size: int, what: str, *, verb: str = "is", at_least: bool = False, detail: str = "") -> None:
        """Raise SizeLimitError saying `what` is `size` units, the limit and how to raise it, when it is too big.

        `at_least` says `size` is what was counted before reading stopped, not the whole; `detail` follows the unit.
        """
        limit = self.value()
        if size > limit:
            amount = f"{'at least ' if at_least else ''}{size:,} {self.unit}{f' {detail}' if detail else ''}"
            raise SizeLimitError(f"{what} {verb} {amount}, more than the limit {limit:,} ({self.env}); "
                                 f"set {self.env} to allow more")


MAX_INPUT_CHARS = SizeLimit("MP_MAX_INPUT_CHARS", 1_000_000, "characters")  # one input value (lists: as JSON)
# A table once decoded (what it takes in memory), and first the file itself, or a folder's text files together.
MAX_TABLE_BYTES = SizeLimit("MP_MAX_TABLE_BYTES", 100_000_000, "bytes")
MAX_TABLE_ROWS = SizeLimit("MP_MAX_TABLE_ROWS", 1_000_000, "rows")  # a table's rows, a folder's text files
# One text cell of a table (a folder's document too): as long as one input value may be.
MAX_CELL_CHARS = SizeLimit("MP_MAX_CELL_CHARS", 1_000_000, "characters")
MAX_PROMPT_CHARS = SizeLimit("MP_MAX_PROMPT_CHARS", 400_000, "characters")  # one rendered prompt or system message
MAX_SPEC_BYTES = SizeLimit("MP_MAX_SPEC_BYTES", 1_000_000, "bytes")  # one workflow YAML file
