"""Numbers the call path reads from the environment (back-off, circuit pause, batch sizes), read each time
they are needed so a long-running process or a test sees a change at once."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from mp_pipelines.spec.size_limits import SettingError

N = TypeVar("N", int, float)


def number_setting(variable: str, default: N, *, read: Callable[[str], N], valid: Callable[[N], bool],
                   rule: str) -> N:
    """`variable` read by `read` when set (else `default`); SettingError saying it must be `rule` when it is no
    number or `valid` refuses it."""
    text = os.environ.get(variable, "")
    if not text.strip():
        return default
    try:
        value = read(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise SettingError(f"{variable}={text.strip()!r} is not valid: it must be {rule}, or unset for the default "
                           f"({default}).")
    return value
