"""Inbox sensors: each new CSV/JSONL/Parquet file in `MP_INBOX_DIR/<workflow>/` starts one run.

The run key is the file's SHA-256, so a file is processed once whatever its name, even after a
restart: identical content under a new name is a duplicate, and Dagster itself drops a run request
whose key a run of this sensor already has. The run is tagged with the file's name and hash.

The cursor remembers each present file's size and mtime and what was decided about it, so a file
is read only when it changed, and a malformed or unreadable one is reported once and not retried
until it changes. A file modified within the last `MP_INBOX_SETTLE_SECONDS` (or named like a
temporary or partial download) may still be being written: it waits for a later tick.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from mp_pipelines.factory.names import LLM_RESOURCE_KEY
from mp_pipelines.factory.partitions import (
    inbox_folder,
    inbox_input,
    inbox_root,
    inbox_run_config,
)
from mp_pipelines.llm.resource import llm_run_config
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.paths import (
    InputPathError,
    InputRoots,
    input_roots,
    is_utf8_name,
    quoted_name,
    readable_file,
    shown_name,
)

INBOX_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet", ".pq")
# Names that writers use while a file is incomplete; such files are left alone until renamed.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
SETTLE_ENV = "MP_INBOX_SETTLE_SECONDS"
INTERVAL_ENV = "MP_INBOX_INTERVAL_SECONDS"
MODE_ENV = "MP_INBOX_MODE"  # batch | online: the call mode of the runs the inbox starts (unset: each task's)
DEFAULT_SETTLE_SECONDS = 5.0
DEFAULT_INTERVAL_SECONDS = 30
FILE_TAG = "mp_pipelines/inbox_file"
SHA256_TAG = "mp_pipelines/inbox_sha256"
# Tags the sensor daemon puts on the runs it launches (stable names of Dagster's system tags).
RUN_KEY_TAG = "dagster/run_key"
SENSOR_NAME_TAG = "dagster/sensor_name"
_CURSOR_VERSION = 1


@dataclass(frozen=True)
class FileState:
    """What the sensor decided about one file, at one size and mtime."""

    signature: str  # "<size>:<mtime_ns>"; a change means the file changed
    outcome: str  # "submitted", "duplicate" or "skipped"
    sha256: str | None = None
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"sig": self.signature, "outcome": self.outcome, "sha256": self.sha256, "reason": self.reason}


@dataclass
class Batch:
    """A new file to run: its name (the run's file tag), absolute path and content hash (the run key)."""

    name: str
    path: Path
    sha256: str


@dataclass
class InboxScan:
    """The outcome of one look at the inbox folder."""

    batches: list[Batch] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)  # (level, text) for the sensor log
    files: dict[str, FileState] = field(default_factory=dict)  # the next cursor's file states

    def log(self, level: str, text: str) -> None:
        self.messages.append((level, text))


def parse_cursor(cursor: str | None) -> dict[str, FileState]:
    """File states from a cursor; an unreadable or older cursor starts afresh (run keys still prevent re-runs)."""
    if not cursor:
        return {}
    try:
        data = json.loads(cursor)
        if data.get("v") != _CURSOR_VERSION:
            return {}
        return {name: FileState(s["sig"], s["outcome"], s.get("sha256"), s.get("reason", ""))
                for name, s in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def dump_cursor(files: Mapping[str, FileState]) -> str:
    return json.dumps({"v": _CURSOR_VERSION, "files": {n: s.as_json() for n, s in sorted(files.items())}},
                      separators=(",", ":"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}"


# Control characters: a file name holding one would reach the run's tag, its log lines and the UI as is.
UNTAGGABLE_CHARACTERS = ("\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


def _name_problem(name: str) -> str | None:
    bad = [s for s in UNTAGGABLE_CHARACTERS if s in name]
    return f"its name contains the control character {bad[0]!r}, which a run's tag may not hold; rename it" if bad else None


def scan_inbox(
    folder: Path,
    previous: Mapping[str, FileState],
    *,
    check_table: Callable[[Path], str | None],
    processed_by: Callable[[str], str | None] = lambda digest: None,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    now: float | None = None,
    roots: InputRoots | None = None,
) -> InboxScan:
    """Decide what to do with every file in `folder`.

    `check_table(path)` returns why a file cannot be used (None when it can); `processed_by(sha256)`
    names the run that already processed that content (None when none did). With `roots`, a file whose real
    path is outside the allowed input roots is skipped unread, as a run would refuse it.
    """
    known = {state.sha256: name for name, state in previous.items()
             if state.sha256 and state.outcome in ("submitted", "duplicate")}
    scanner = _Scanner(folder, check_table, processed_by, settle_seconds, time.time() if now is None else now, known,
                       roots)
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name.lower().endswith(PARTIAL_SUFFIXES):
            continue  # hidden or still being written under a temporary name: not ours yet
        scanner.visit(entry, previous.get(shown_name(entry.name)))
    return scanner.scan


def _stat_signature(entry: Path) -> tuple[os.stat_result | None, str, OSError | None]:
    """The entry's stat, its signature and, when it cannot be statted, the error."""
    try:
        stat = entry.stat()
    except OSError as exc:  # a dangling symlink, a file removed while listing, no permission
        # The error goes into the signature so the file is reported once, until the error changes.
        return None, f"unstatable:{type(exc).__name__}", exc
    return stat, _signature(stat), None


def _unusable_reason(entry: Path, error: OSError | None, folder: Path, roots: InputRoots | None) -> str | None:
    """Why an entry cannot be an inbox table as it stands (its name, unstatable, not a file, wrong suffix, outside
    the allowed input roots, or a link leading out of the inbox or into /proc)."""
    if not is_utf8_name(entry.name):
        return "its name is not valid UTF-8, which run tags need; rename it"
    if error is not None:
        return f"cannot read it: {error.strerror or error}"
    if not entry.is_file():
        return "it is not a regular file"
    if entry.suffix.lower() not in INBOX_SUFFIXES:
        return f"it is not a {', '.join(INBOX_SUFFIXES)} file (other files in the inbox are ignored)"
    what = f"file {quoted_name(entry.name)} of the inbox"
    try:
        readable_file(entry, what=what, inside=[folder])
        if roots is not None:
            roots.check(entry, what=what)
    except InputPathError as exc:
        return f"refused: {exc}"
    return None


@dataclass
class _Scanner:
    """One scan's inputs and running result; `visit` decides about one folder entry."""

    folder: Path
    check_table: Callable[[Path], str | None]
    processed_by: Callable[[str], str | None]
    settle_seconds: float
    now: float
    known: dict[str, str]  # content hash -> first file name with it, updated as files are taken
    roots: InputRoots | None = None
    scan: InboxScan = field(default_factory=InboxScan)

    def visit(self, entry: Path, earlier: FileState | None) -> None:
        """Decide about one entry and record the outcome (cursor state, log line, batch)."""
        name = shown_name(entry.name)  # the cursor is JSON and the log UTF-8: a name that is not keeps escapes
        stat, signature, error = _stat_signature(entry)
        if earlier is not None and earlier.signature == signature:
            self.scan.files[name] = earlier  # decided before and unchanged since: nothing to do
            return
        reason = _unusable_reason(entry, error, self.folder, self.roots)
        if reason:
            _skip(self.scan, name, signature, reason)
            return
        if self._settling(name, stat):  # stat is set: an unstatable entry was skipped above
            return
        read = self._read(entry, signature)
        if read is None:
            return
        digest, problem = read
        if problem:
            _skip(self.scan, name, signature, problem, digest)
            return
        self._take(entry, signature, digest)

    def _settling(self, name: str, stat: os.stat_result) -> bool:
        """Whether the file was modified too recently to be complete; it is then left for a later tick."""
        age = self.now - stat.st_mtime
        if age >= self.settle_seconds:
            return False
        # Not recorded in the cursor, so the next tick looks at it again.
        self.scan.log("info", f"{name}: modified {max(age, 0):.1f} s ago, may still be being written; "
                              f"waiting until it is {self.settle_seconds:g} s old")
        return True

    def _read(self, entry: Path, signature: str) -> tuple[str, str | None] | None:
        """The file's hash and what is wrong with it, or None when it could not be read or changed meanwhile."""
        problem = _name_problem(entry.name)
        try:
            digest = file_sha256(entry)
            problem = problem or self._check(entry)
            after = entry.stat()
        except OSError as exc:
            _skip(self.scan, entry.name, signature, f"cannot read it: {exc.strerror or exc}")
            return None
        # A file that changed while hashed or checked is still being written: hash and check are of a partial file.
        if _signature(after) != signature:
            self.scan.log("info", f"{entry.name}: changed while being read, may still be being written; waiting")
            return None
        return digest, problem

    def _check(self, entry: Path) -> str | None:
        """What `check_table` finds wrong with the file; an error it raises is that file's problem only."""
        try:
            return self.check_table(entry)
        except OSError:
            raise  # reported by _read as "cannot read it"
        except Exception as exc:  # noqa: BLE001 - one file the checker cannot handle must not stop the others
            return f"cannot check it: {type(exc).__name__}: {exc}"

    def _take(self, entry: Path, signature: str, digest: str) -> None:
        """Record a good file as a duplicate of content already processed, or as a new batch."""
        name = entry.name
        first = self.known.get(digest) or self.processed_by(digest)
        if first is not None:
            self.scan.files[name] = FileState(signature, "duplicate", digest, f"same content as {first}")
            self.scan.log("info", f"{name}: skipped, same content as {first} (sha256 {digest[:12]}…); "
                                  "each content is processed once")
            return
        # Later files in this scan with the same content are duplicates of this one.
        self.known[digest] = name
        self.scan.files[name] = FileState(signature, "submitted", digest)
        self.scan.batches.append(Batch(name, entry.resolve(), digest))


def _skip(scan: InboxScan, name: str, signature: str, reason: str,
          digest: str | None = None) -> None:
    scan.files[name] = FileState(signature, "skipped", digest, reason)
    scan.log("warning", f"{name}: skipped, {reason}; it is not retried until it changes")


def table_checker(spec: WorkflowSpec, input_name: str) -> Callable[[Path], str | None]:
    """Why a file is no good as the workflow's table input (malformed, empty, too large, refused: a path that may
    not be read or a nested Parquet column), or None.

    It reads only what deciding needs: Parquet metadata, then chunks of rows, stopping at the first limit passed;
    no DataFrame of the whole file is built.
    """
    from mp_pipelines.spec.inputs import check_table
    from mp_pipelines.spec.size_limits import SizeLimitError
    from mp_pipelines.spec.tables import UnsupportedColumnError

    def check(path: Path) -> str | None:
        try:
            rows = check_table(path, name=input_name, max_rows=spec.max_items)
        except SizeLimitError as exc:
            return f"too large: {exc}"
        except (InputPathError, UnsupportedColumnError) as exc:
            return f"refused: {exc}"
        except ValueError as exc:
            return f"malformed: {exc}"
        if rows == 0:
            return f"malformed: {path.name} has no rows"
        return None

    return check


def settle_seconds() -> float:
    value = os.environ.get(SETTLE_ENV)
    try:
        return float(value) if value else DEFAULT_SETTLE_SECONDS
    except ValueError:
        raise ValueError(f"{SETTLE_ENV}={value!r} is not a number of seconds") from None


def interval_seconds() -> int:
    value = os.environ.get(INTERVAL_ENV)
    try:
        return int(value) if value else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={value!r} is not a whole number of seconds") from None


def inbox_sensor_name(spec: WorkflowSpec) -> str:
    return f"{spec.name}_inbox_sensor"


def build_inbox_sensor(spec: WorkflowSpec) -> dg.SensorDefinition | None:
    """The sensor `<workflow>_inbox_sensor` for a workflow with one table input, else None.

    Running by default when MP_INBOX_DIR is set, stopped (switch it on in the UI) otherwise.
    """
    input_name = inbox_input(spec)
    if input_name is None:
        return None
    name = inbox_sensor_name(spec)
    # Built once per definitions load, not per tick: the checker and the default status.
    check = table_checker(spec, input_name)
    status = dg.DefaultSensorStatus.RUNNING if os.environ.get("MP_INBOX_DIR") else dg.DefaultSensorStatus.STOPPED

    def evaluate(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        return _evaluate_inbox(context, spec, name, check)

    return dg.SensorDefinition(
        name=name,
        evaluation_fn=evaluate,
        job_name=spec.name,
        minimum_interval_seconds=interval_seconds(),
        default_status=status,
        description=(f"Starts {spec.name} once per new CSV/JSONL/Parquet file in MP_INBOX_DIR/{spec.name}/ "
                     f"(input `{input_name}`); each file is one run, its SHA-256 the run key."),
    )


def _evaluate_inbox(
    context: dg.SensorEvaluationContext,
    spec: WorkflowSpec,
    sensor_name: str,
    check: Callable[[Path], str | None],
) -> dg.SensorResult | dg.SkipReason:
    """One tick of an inbox sensor: scan the folder, log what was decided, request runs for new files."""
    folder = inbox_folder(spec.name)
    if not folder.is_dir():
        return dg.SkipReason(f"inbox folder {folder} does not exist; create it (or set MP_INBOX_DIR) "
                             f"and put CSV/JSONL/Parquet files for {spec.name} in it")
    # MP_INBOX_SETTLE_SECONDS is read at every tick (MP_INBOX_INTERVAL_SECONDS once, when the sensor is built).
    scan = scan_inbox(folder, parse_cursor(context.cursor), check_table=check,
                      processed_by=_run_lookup(context, sensor_name), settle_seconds=settle_seconds(),
                      roots=input_roots(inbox=inbox_root()))
    for level, text in scan.messages:
        getattr(context.log, level)(f"{spec.name} inbox: {text}")
    requests = [_run_request(spec, batch) for batch in scan.batches]
    for batch in scan.batches:
        context.log.info(f"{spec.name} inbox: {batch.name}: starting a run ("
                         f"sha256 {batch.sha256[:12]}…)")
    skipped = sum(state.outcome == "skipped" for state in scan.files.values())
    return dg.SensorResult(
        run_requests=requests or None,
        cursor=dump_cursor(scan.files),
        skip_reason=None if requests else f"no new files in {folder} ({skipped} skipped, see the sensor log)",
    )


def _run_lookup(context: dg.SensorEvaluationContext, sensor_name: str) -> Callable[[str], str | None]:
    """`processed_by` for scan_inbox: the file and run of this sensor that already had a content hash."""
    # The cursor can be lost or reset; the runs this sensor launched (keyed by hash) cannot.

    def processed_by(digest: str) -> str | None:
        runs = context.instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: digest,
                                                                      SENSOR_NAME_TAG: sensor_name}), limit=1)
        if not runs:
            return None
        return f"{runs[0].tags.get(FILE_TAG, 'a file')} (run {runs[0].run_id})"

    return processed_by


def _run_request(spec: WorkflowSpec, batch: Batch) -> dg.RunRequest:
    """The run for one new file: its hash the run key, its name and hash tags; MP_INBOX_MODE its call mode."""
    config = inbox_run_config(spec, batch.path)
    mode = os.environ.get(MODE_ENV, "").strip()
    if mode:
        if mode not in ("batch", "online"):
            raise ValueError(f"{MODE_ENV}={mode!r} is not valid: it must be batch or online (or unset, for each "
                             "task's `mode:`)")
        config = {**config, "resources": {LLM_RESOURCE_KEY: llm_run_config(mode)}}
    return dg.RunRequest(run_key=batch.sha256, run_config=config,
                         tags={FILE_TAG: batch.name, SHA256_TAG: batch.sha256})
