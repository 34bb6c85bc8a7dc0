"""Resources of the generated jobs besides the LLM itself (that one is `llm.resource.LLMResource`)."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from mp_pipelines.calls.run import RunCalls
from mp_pipelines.spec.models import BudgetSpec, WorkflowSpec

_RUN_CALLS_LOCK = threading.Lock()  # a resource is copied by Dagster: a lock must not be one of its attributes


class RunBudget(dg.ConfigurableResource):
    """A run's budget. Unset fields fall back to the workflow's `budget:`; set one per run in the run config:
    `resources: {budget: {config: {max_cost_usd: 0.5}}}` (or `mp-pipelines run --max-cost-usd 0.5`).

    It also owns the run's call-path state in this process (`RunCalls`: the run's limiters, fan-out
    semaphores, budget account, identical calls in flight), made at set-up and dropped at teardown.
    """

    max_cost_usd: float | None = Field(default=None, gt=0, description="US dollars (price table).")
    max_tokens: int | None = Field(default=None, ge=1, description="Prompt + completion tokens.")
    max_calls: int | None = Field(default=None, ge=1, description="Calls sent to the model; cache hits are free.")
    from_flags: list[str] = Field(default_factory=list, description="The fields above that mp-pipelines run/resume "
                                  "set from its --max-… flags (named in the budget error).")

    _calls: RunCalls | None = PrivateAttr(default=None)

    def over(self, spec: WorkflowSpec) -> BudgetSpec:
        """This run's budget: the run config's fields over the workflow's."""
        base = spec.budget.model_dump() if spec.budget else {}
        mine = {k: v for k, v in self.model_dump().items() if k in BudgetSpec.model_fields and v is not None}
        origins = {k: "flag" if k in self.from_flags else "run_config" for k in mine}
        return BudgetSpec(**{**base, **mine}).with_origins(origins)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Open the run's call-path state."""
        self._calls = RunCalls(context.run_id or "")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Drop the run's call-path state: the run's steps in this process are done."""
        calls, self._calls = self._calls, None
        if calls is not None:
            calls.close()

    def run_calls(self, run_id: str) -> RunCalls:
        """The run's call-path state (made on first use when the resource runs outside Dagster's set-up)."""
        with _RUN_CALLS_LOCK:
            if self._calls is None or self._calls.run_id != run_id:
                self._calls = RunCalls(run_id)
            return self._calls


class StepStorage(dg.ConfigurableIOManager):
    """Where steps hand their outputs to the next and task assets keep their values, as pickles under `base_dir`
    (unset: the instance's storage folder).

    Every output is written under its run (`<run id>/<step key>/<output>`) and read from there by the steps that
    consume it, in the same run or in a re-execution of it. A task asset's value is also published, atomically, at
    its asset key's path (`<workflow>/<task>`): the latest materialization, which a subset run reads for assets it
    does not materialize. So concurrent runs of one workflow (two inbox files, two `mp-pipelines run`s) never read
    each other's values, and a reader never sees a half-written file.
    """

    base_dir: str | None = Field(default=None, description="Folder of the stored values; every worker mounts it at "
                                 "the same path (unset: the instance's storage folder).")

    _root: Path | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._root = Path(self.base_dir or (context.instance.storage_directory() if context.instance else "storage"))

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else Path(self.base_dir or "storage")

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        path = _run_output_path(self.root, context)
        assert path is not None, "Dagster hands every output over with its run, step and name"
        _write_atomically(path, obj)
        if context.has_asset_key:
            latest = self.root.joinpath(*context.asset_key.path)
            _publish(path, latest)
            if obj is not None:
                context.add_output_metadata({"path": dg.MetadataValue.path(str(latest))})

    def load_input(self, context: dg.InputContext) -> object:
        produced = _run_output_path(self.root, context.upstream_output)
        if produced is not None and produced.exists():
            return _load(produced)
        if not context.has_asset_key:
            raise FileNotFoundError(errno.ENOENT, "no stored output", str(produced))
        latest = self.root.joinpath(*context.asset_key.path)
        try:
            return _load(latest)
        except FileNotFoundError:
            raise dg.Failure(missing_upstream(context.asset_key, str(latest)), allow_retries=False) from None


def _run_output_path(root: Path, upstream: dg.OutputContext | None) -> Path | None:
    """Where the run that produced output `upstream` stored it (Dagster's layout: `<run id>/<step key>/<output>`
    [`/<mapping key>`]); None when Dagster names no producing step (an asset this run does not materialize: its
    latest value is read instead)."""
    if upstream is None:
        return None
    try:
        run_id, step_key, name = upstream.run_id, upstream.step_key, upstream.name
    except dg.DagsterInvariantViolationError:  # a context built without them
        return None
    if not run_id or not step_key or not name:
        return None
    path = root / run_id / step_key / name
    return path / upstream.mapping_key if upstream.mapping_key else path  # one file per item of a dynamic output


def _load(path: Path) -> object:
    with path.open("rb") as file:
        return pickle.load(file)


@contextlib.contextmanager
def _renamed_into_place(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, for the block to write; renamed over `path` when the block ends, so a
    concurrent reader gets the old file or the new one, never part of one; removed when anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_atomically(path: Path, obj: object) -> None:
    """`obj` pickled at `path`, in one step."""
    with _renamed_into_place(path) as temporary, temporary.open("xb") as file:
        pickle.dump(obj, file, protocol=pickle.HIGHEST_PROTOCOL)


def _publish(stored: Path, latest: Path) -> None:
    """Make `latest` the value at `stored`, in one step: a hard link (a copy where the file system has none)."""
    with _renamed_into_place(latest) as temporary:
        try:
            os.link(stored, temporary)
        except OSError:
            shutil.copyfile(stored, temporary)


def missing_upstream(key: dg.AssetKey, path: str | None) -> str:
    """Why a subset cannot run: asset `key` it reads was never materialized (with this step storage)."""
    workflow = key.path[0]
    where = f" (nothing stored at {path})" if path else ""
    return (f"asset {key.to_user_string()} has never been materialized{where}, and the assets selected read it: "
            f"materialize it too (select it with what is downstream of it, e.g. 'Materialize' on it in the Catalog), "
            f"or run the whole workflow first (`mp-pipelines run {workflow}`)")
