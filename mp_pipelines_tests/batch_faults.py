"""Scripted Batch API faults for the simulated model's batches (`mp_pipelines.llm.simulated_batches`).

`BatchFaults` reacts to lines by `custom_id` (an HTTP error in the error file, or an exact answer text) and makes
chosen batches expire with only their first lines run. Install it with `model.batches.faults = BatchFaults(model)`.
`NoBatchAPI` stands for a server without the Batch API (vLLM, Ollama): 404 on every files and batches route.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from mp_pipelines.llm.simulated import SimulatedModel


class BatchFaults:
    """Per-line reactions (used once each, in order) and expiring batches."""

    def __init__(self, model: SimulatedModel) -> None:
        self.model = model
        self._lines: dict[str, deque[tuple[int, Any]]] = {}
        self._expiring: dict[int, int] = {}

    def fail_line(self, custom_id: str, status: int = 500, message: str = "Simulated line failure.") -> BatchFaults:
        """The next time `custom_id` runs, it fails with HTTP `status`."""
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        self._lines.setdefault(custom_id, deque()).append((status, body))
        return self

    def answer_line(self, custom_id: str, content: str) -> BatchFaults:
        """The next time `custom_id` runs, it is answered with exactly `content` (e.g. JSON that is not valid)."""
        self._lines.setdefault(custom_id, deque()).append((200, content))
        return self

    def expire(self, batch_number: int, keep: int) -> BatchFaults:
        """Batch number `batch_number` (1-based, in order of creation) expires after running its first `keep` lines."""
        self._expiring[batch_number] = keep
        return self

    def line(self, custom_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        reactions = self._lines.get(custom_id)
        if not reactions:
            return None
        status, payload = reactions.popleft()
        if status == 200:
            return 200, self.model.completion(body, payload)
        return status, payload

    def expires(self, batch_number: int) -> int | None:
        return self._expiring.get(batch_number)


class NoBatchAPI:
    """The Batch API routes of a server that has none."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def route(self, method: str, path: str, raw: bytes, content_type: str) -> tuple[int, dict[str, str], Any]:
        self.requests.append((method, path))
        return 404, {}, {"detail": "Not Found"}
