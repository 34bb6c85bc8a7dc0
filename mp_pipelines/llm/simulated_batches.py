"""The simulated model's Batch API: `/v1/files` and `/v1/batches` as OpenAI serves them, offline.

An uploaded JSONL file of chat requests becomes a batch that moves through `validating`, `in_progress` and
`finalizing` over `completion_delay` seconds (read when polled, so waiting costs the server nothing), then
`completed` with an output file whose lines come in shuffled order, as OpenAI's do. Each line is answered by
the same `SimulatedModel.completion` as an online call, so batch and online answers are equal.

Faults (a line's HTTP error, a batch that expires with part of its lines done) are not the model's business:
the test support code sets `faults`, an object with `line(custom_id, body) -> (status, body) | None` and
`expires(batch_number) -> lines kept | None`.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any, Protocol

from mp_pipelines.spec.size_limits import SettingError

if TYPE_CHECKING:
    from mp_pipelines.llm.simulated import SimulatedModel

DELAY_ENV = "MP_SIMULATED_BATCH_SECONDS"  # seconds a simulated batch takes to complete (default 0)
Reply = tuple[int, dict[str, str], Any]  # status, headers, JSON value or raw bytes


def simulated_batch_seconds() -> float:
    """MP_SIMULATED_BATCH_SECONDS (default 0); SettingError when it is no number of seconds, 0 or more."""
    text = os.environ.get(DELAY_ENV, "").strip()
    try:
        seconds = float(text or 0)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise SettingError(f"{DELAY_ENV}={text!r} is not valid: it must be a number of seconds, 0 or more, or unset "
                           "for the default (0).")
    return seconds


class BatchFaults(Protocol):
    """Scripted per-line errors and expiry (see mp_pipelines_tests)."""

    def line(self, custom_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None: ...

    def expires(self, batch_number: int) -> int | None: ...


def is_batch_path(path: str) -> bool:
    """Whether a request path belongs to the Batch API (files or batches)."""
    return "/files" in path or "/batches" in path


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Reply:
    return status, {}, {"error": {"message": message, "type": kind, "param": None, "code": None}}


@dataclass
class _Batch:
    id: str
    number: int  # 1-based, in order of creation
    input_file_id: str
    endpoint: str
    metadata: dict[str, str]
    created_at: float
    lines: list[dict[str, Any]]
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    final_status: str | None = None  # completed | expired | cancelled once finished
    done: dict[str, int] = field(default_factory=lambda: {"completed": 0, "failed": 0})


class SimulatedBatches:
    """Files and batches of one simulated endpoint, in memory."""

    def __init__(self, model: SimulatedModel, completion_delay: float | None = None, seed: int = 0) -> None:
        self.model = model
        delay = completion_delay if completion_delay is not None else simulated_batch_seconds()
        self.completion_delay = delay
        self.faults: BatchFaults | None = None
        self.created: list[str] = []  # ids of every batch created, in order: the submissions log
        self.cancelled: list[str] = []
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, _Batch] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def route(self, method: str, path: str, raw: bytes, content_type: str) -> Reply:
        """Answer one Batch API request: (status, headers, JSON value or bytes)."""
        parts = path.rstrip("/").split("/")
        if "files" not in parts and "batches" not in parts:
            return _error(404, f"No simulated route for {method} {path}.", "not_found")
        tail = parts[parts.index("files") if "files" in parts else parts.index("batches"):]
        with self._lock:
            if tail == ["files"] and method == "POST":
                return self._upload(raw, content_type)
            if tail[0] == "files" and len(tail) == 3 and tail[2] == "content" and method == "GET":
                found = self._files.get(tail[1])
                return (200, {"content-type": "application/jsonl"}, found[1]) if found else _error(
                    404, f"No file with id {tail[1]!r}.")
            if tail[0] == "files" and len(tail) == 2 and method == "GET":
                found = self._files.get(tail[1])
                return (200, {}, found[0]) if found else _error(404, f"No file with id {tail[1]!r}.")
            if tail == ["batches"] and method == "POST":
                return self._create(raw)
            if tail[0] == "batches" and len(tail) >= 2 and tail[1] in self._batches:
                batch = self._batches[tail[1]]
                if len(tail) == 3 and tail[2] == "cancel" and method == "POST":
                    if batch.final_status is None and batch.cancelled_at is None:
                        batch.cancelled_at = time.time()
                        self.cancelled.append(batch.id)
                    return 200, {}, self._view(batch)
                if len(tail) == 2 and method == "GET":
                    return 200, {}, self._view(batch)
            if tail[0] == "batches" and len(tail) >= 2:
                return _error(404, f"No batch with id {tail[1]!r}.")
        return _error(404, f"No simulated route for {method} {path}.", "not_found")

    # -- files --
    def _upload(self, raw: bytes, content_type: str) -> Reply:
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        if not message.is_multipart():
            return _error(400, "A file upload must be multipart/form-data with fields 'purpose' and 'file'.")
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields or fields.get("purpose", (None, b""))[1].decode() != "batch":
            return _error(400, "A batch input file needs purpose 'batch' and a 'file' part.")
        filename, data = fields["file"]
        return 200, {}, self._store_file(data, filename or "input.jsonl", "batch")

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-sim-{len(self._files) + 1:06d}-{self._rng.getrandbits(32):08x}"
        info = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self._files[file_id] = (info, data)
        return info

    # -- batches --
    def _create(self, raw: bytes) -> Reply:
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or body.get("input_file_id") not in self._files:
            return _error(400, "A batch needs the 'input_file_id' of an uploaded file.")
        if body.get("completion_window") != "24h":
            return _error(400, "completion_window must be '24h'.")
        lines = []
        for number, text in enumerate(self._files[body["input_file_id"]][1].decode().splitlines(), 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                return _error(400, f"Line {number} of the input file is not JSON.")
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or "body" not in line:
                return _error(400, f"Line {number} of the input file needs 'custom_id', 'method', 'url' and 'body'.")
            lines.append(line)
        if len({line["custom_id"] for line in lines}) != len(lines):
            return _error(400, "The input file repeats a custom_id.")
        number = len(self.created) + 1
        batch = _Batch(f"batch_sim_{number:06d}_{self._rng.getrandbits(32):08x}", number, body["input_file_id"],
                       body.get("endpoint", "/v1/chat/completions"), dict(body.get("metadata") or {}), time.time(),
                       lines)
        self._batches[batch.id] = batch
        self.created.append(batch.id)
        return 200, {}, self._view(batch)

    def _status(self, batch: _Batch) -> str:
        """Where the batch is in its lifecycle now; finishing it (its output files) the first time it is done."""
        if batch.final_status is not None:
            return batch.final_status
        now = time.time()
        if batch.cancelled_at is not None:
            if now - batch.cancelled_at < min(self.completion_delay, 1.0) * 0.5:
                return "cancelling"
            self._finish(batch, "cancelled", 0)
            return "cancelled"
        elapsed, delay = now - batch.created_at, self.completion_delay
        if elapsed >= delay:
            keep = self.faults.expires(batch.number) if self.faults is not None else None
            self._finish(batch, "expired" if keep is not None else "completed",
                         len(batch.lines) if keep is None else keep)
            return batch.final_status or "completed"
        if elapsed < 0.1 * delay:
            return "validating"
        return "in_progress" if elapsed < 0.9 * delay else "finalizing"

    def _finish(self, batch: _Batch, status: str, answered: int) -> None:
        output, errors = [], []
        for number, line in enumerate(batch.lines):
            custom_id, body = line["custom_id"], line["body"]
            request_id = f"req_sim_{batch.number}_{number}"
            if number >= answered:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                errors.append({"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": None,
                               "error": {"code": code, "message": f"This request could not be executed before the "
                                                                  f"batch was {status}."}})
                continue
            scripted = self.faults.line(custom_id, body) if self.faults is not None else None
            if scripted is not None:
                code, payload = scripted
                entry = {"id": f"batch_req_{request_id}", "custom_id": custom_id, "error": None,
                         "response": {"status_code": code, "request_id": request_id, "body": payload}}
                (output if code == 200 else errors).append(entry)
                continue
            status_code, _, payload = self._answer(body)
            entry = {"id": f"batch_req_{request_id}", "custom_id": custom_id, "error": None,
                     "response": {"status_code": status_code, "request_id": request_id, "body": payload}}
            (output if status_code == 200 else errors).append(entry)
        self._rng.shuffle(output)  # OpenAI's output order is not the input order
        batch.done = {"completed": len(output), "failed": len(errors)}
        if output:
            data = "".join(json.dumps(e) + "\n" for e in output).encode()
            batch.output_file_id = self._store_file(data, f"{batch.id}_output.jsonl", "batch_output")["id"]
        if errors:
            data = "".join(json.dumps(e) + "\n" for e in errors).encode()
            batch.error_file_id = self._store_file(data, f"{batch.id}_error.jsonl", "batch_output")["id"]
        batch.final_status = status

    def _answer(self, body: Any) -> Reply:
        """One line's answer: a chat completion as an online call would get, without injected failures."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(body.get("model"), str):
            return _error(400, "A chat request needs 'model' and a non-empty 'messages' list.")
        return 200, {}, self.model.completion(body)

    def _view(self, batch: _Batch) -> dict[str, Any]:
        status = self._status(batch)
        total = len(batch.lines)
        counts = dict(batch.done)
        if status in ("in_progress", "finalizing"):
            share = min(1.0, (time.time() - batch.created_at) / self.completion_delay) if self.completion_delay else 1
            counts = {"completed": int(total * share), "failed": 0}
        created = int(batch.created_at)
        return {"id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
                "input_file_id": batch.input_file_id, "completion_window": "24h", "status": status,
                "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
                "created_at": created, "in_progress_at": created, "expires_at": created + 86_400,
                "finalizing_at": None, "completed_at": int(time.time()) if status == "completed" else None,
                "failed_at": None, "expired_at": int(time.time()) if status == "expired" else None,
                "cancelling_at": int(batch.cancelled_at) if batch.cancelled_at else None,
                "cancelled_at": int(time.time()) if status == "cancelled" else None,
                "request_counts": {"total": total, **counts}, "metadata": batch.metadata}
