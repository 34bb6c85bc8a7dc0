"""Log formats: `MP_LOG_FORMAT=json` writes one JSON object per line, for a collector; the default stays readable.

Both read what Dagster attaches to each record of a run (`record.dagster_meta`: run id, job, step key, event) and
what the project's own lines add under `extra={"mp": {...}}` (task, item index, model, tokens, cost, latency, retry
attempt), and both carry the run's trace id (`telemetry.setup.trace_id_hex`), so a log line leads to its trace.
They are plain `logging.Formatter`s: the jobs' `console` logger uses them, and so can the instance's
`python_logs.dagster_handler_config` (webserver, daemon and run workers), see docs/observability.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from typing import Any

from mp_pipelines.spec.models import RESERVED_SEPARATOR
from mp_pipelines.spec.size_limits import SettingError
from mp_pipelines.telemetry.names import LOG_FORMAT_ENV
from mp_pipelines.telemetry.setup import trace_id_hex

_TASK_OF_STEP = re.compile(r"\[|" + re.escape(RESERVED_SEPARATOR))
_ITEM_STEP = re.compile(r".+\[(\d+)\]$")  # a mapped step of one item: research[3]
FIELDS = ("model", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s", "attempt", "item_index", "calls",
          "cache_hits", "task")


def json_logs() -> bool:
    """Whether MP_LOG_FORMAT asks for JSON lines (`json`); anything else but `text` or unset is an error."""
    value = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if value in ("", "text"):
        return False
    if value == "json":
        return True
    raise SettingError(f"{LOG_FORMAT_ENV}={value!r} is not valid: it must be json or text, or unset for text.")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Everything known about a record: Dagster's run/job/step, the project's fields, the trace id."""
    meta = getattr(record, "dagster_meta", None) or {}
    fields: dict[str, Any] = {}
    run_id = meta.get("run_id")
    if run_id:
        fields["run_id"] = run_id
        fields["trace_id"] = trace_id_hex(run_id)
    if meta.get("job_name"):
        fields["job"] = meta["job_name"]
    step = meta.get("step_key")
    if step:
        fields["step"] = step
        fields["task"] = _TASK_OF_STEP.split(step, maxsplit=1)[0]
        item = _ITEM_STEP.fullmatch(step)
        if item:
            fields["item_index"] = int(item.group(1))
    event = meta.get("dagster_event")
    if event is not None:
        fields["event"] = event.event_type_value
    extra = getattr(record, "mp", None)
    if isinstance(extra, dict):
        fields.update({k: v for k, v in extra.items() if v is not None})
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, message and `record_fields`."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            **record_fields(record),
            "message": meta.get("orig_message") or record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Dagster's console line (`time - name - level - job - run - step - message`), then `trace_id=…`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s - %(name)s - %(levelname)s - %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        meta = getattr(record, "dagster_meta", None) or {}
        return f"{text} - trace_id={trace_id_hex(meta['run_id'])}" if meta.get("run_id") else text


def formatter() -> logging.Formatter:
    """The formatter MP_LOG_FORMAT asks for."""
    return JsonFormatter() if json_logs() else TextFormatter()
