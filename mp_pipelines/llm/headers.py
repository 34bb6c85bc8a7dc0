"""What an HTTP response asks of the caller: how long to wait before trying again."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds a response asks to wait (`retry-after-ms`, or `retry-after` in seconds or as an HTTP date);
    None when it asks nothing readable. Never negative."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            pass
        if name == "retry-after":
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(when.timestamp() - time.time(), 0.0)
    return None
