"""Run in spawned processes by test_reliability: open a response store the moment all of them are ready.

(Its own module so a spawned worker imports the store only, not the test module's Dagster; spawned because
forking the test process, which holds writer and event-loop threads, can deadlock the child.)"""

from __future__ import annotations

from typing import Any

from mp_pipelines.calls.store import ResponseStore


def open_store_and_count(url: str, start: Any) -> str | None:
    """None if a store at `url` opened and is empty, else what went wrong."""
    start.wait()
    try:
        return None if ResponseStore(url).count() == 0 else "not empty"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return repr(exc)
