"""A step that finishes waits for its answers to be stored (`ResponseStore.flush`): the writer then stores what is
queued at once instead of after its gathering window, and a burst nobody waits for is still gathered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mp_pipelines.calls import store as store_module
from mp_pipelines.calls.store import Entry, ResponseStore
from mp_pipelines.llm.client import LLMResult


def _entry(key: str) -> Entry:
    result = LLMResult(text=f"answer {key}", parsed=None, model="gpt-4o-mini", provider="openai", prompt_tokens=3,
                       completion_tokens=2, latency_s=0.1, finish_reason="stop", attempts=1)
    return Entry("", key, "wf", "t", result)


def test_flush_stores_queued_answers_without_waiting_for_the_gathering_window(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(store_module, "FLUSH_SECONDS", 20.0)  # a window no test would wait out
    store = ResponseStore(f"sqlite:///{tmp_path / 'answers.sqlite'}")
    for i in range(5):
        store.put(_entry(f"k{i}"))
    started = time.monotonic()
    assert store.flush(timeout=15.0)
    assert time.monotonic() - started < 10.0
    assert store.count() == 5
    assert store.get("", "k3").text == "answer k3"


def test_writes_nobody_waits_for_are_gathered_into_one_batch(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(store_module, "FLUSH_SECONDS", 0.5)
    store = ResponseStore(f"sqlite:///{tmp_path / 'answers.sqlite'}")
    batches: list[int] = []
    write = store._write

    def counted(batch: list) -> None:
        batches.append(len(batch))
        write(batch)

    store._write = counted  # type: ignore[method-assign]
    for i in range(20):
        store.put(_entry(f"k{i}"))
    deadline = time.monotonic() + 15
    while sum(batches) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(batches) == 20 and len(batches) <= 2, batches
    assert store.flush()
