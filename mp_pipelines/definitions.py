"""The code location: load every workflow spec, build its definitions, add the LLM resource.

`dagster dev` (via workspace.yaml) and `dagster definitions validate` load `defs` from here. Importing
this module builds nothing: `defs` is loaded when Dagster asks for it, and a run worker or step process
rebuilds only the job it runs (`get_job`). A workflow file with problems is reported and left out; the
others still load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg

from mp_pipelines.factory.job import executor_for_breadth, op_count, recursion_headroom
from mp_pipelines.factory.logs import LOGGER_DEFS
from mp_pipelines.factory.names import BUDGET_RESOURCE_KEY, LLM_RESOURCE_KEY
from mp_pipelines.factory.resources import RunBudget, StepStorage
from mp_pipelines.factory.workflow import build_workflow_definitions
from mp_pipelines.llm.provider import provider_from_env
from mp_pipelines.llm.resource import build_llm_resource
from mp_pipelines.sensors.failures import build_failure_sensor
from mp_pipelines.sensors.inbox import build_inbox_sensor
from mp_pipelines.spec.loader import LoadResult, Problem, load_workflows
from mp_pipelines.spec.models import WorkflowSpec

logger = logging.getLogger("mp_pipelines")
DEFAULT_BREADTH = WorkflowSpec.model_fields["breadth"].default


def build_definitions(loaded: LoadResult) -> dg.Definitions:
    """Definitions of every loaded workflow plus the shared resources."""
    parts = []
    problems = list(loaded.problems)
    for name, spec in loaded.specs.items():
        try:
            source = loaded.sources.get(name)
            parts.append(build_workflow_parts(spec, Path(source).parent if source else None))
        except Exception as exc:  # a bug for one workflow must not take the code location down
            problems.append(Problem(str(loaded.sources.get(name, name)), "", f"could not build job: {exc}"))
    for problem in problems:
        logger.warning("workflow not loaded: %s", problem)
    return dg.Definitions.merge(*parts, build_shared_parts(build_shared_resources(), build_failure_sensor()))


def build_workflow_parts(spec: WorkflowSpec, base_dir: Path | None) -> dg.Definitions:
    """One workflow's job, assets and schedule, and its inbox sensor when it has a table input; relative table
    inputs resolve against `base_dir` (the folder of its spec file)."""
    parts = build_workflow_definitions(spec, provider=provider_from_env(), base_dir=base_dir)
    inbox_sensor = build_inbox_sensor(spec)  # workflows with a table input start runs from files
    return dg.Definitions.merge(parts, dg.Definitions(sensors=[inbox_sensor] if inbox_sensor else []))


def build_shared_parts(resources: dict[str, Any], failure_sensor: dg.SensorDefinition) -> dg.Definitions:
    """What the workflows of a code location share, with its run-failure sensor (also used by components.py)."""
    # `console` for every job: with the trace id, or JSON lines (MP_LOG_FORMAT=json). The executor is for Dagster's
    # own asset job, which the Catalog's "Materialize" launches: the workflow jobs' executor, at the default breadth.
    return dg.Definitions(resources=resources, sensors=[failure_sensor], loggers=LOGGER_DEFS,
                          executor=asset_job_executor())


@lru_cache(maxsize=1)
def asset_job_executor() -> dg.ExecutorDefinition:
    """One executor object per process: `Definitions.merge` accepts the same executor from several parts (one per
    Dagster Component) but not two different ones."""
    return executor_for_breadth(DEFAULT_BREADTH)


def build_shared_resources() -> dict[str, Any]:
    """The resources every workflow's runs use: LLM, budget, and the step storage when set."""
    resources: dict[str, Any] = {LLM_RESOURCE_KEY: build_llm_resource(), BUDGET_RESOURCE_KEY: RunBudget()}
    resources["io_manager"] = step_storage_io_manager()
    return resources


STEP_STORAGE_DIR_ENV = "MP_STEP_STORAGE_DIR"


def step_storage_io_manager() -> StepStorage:
    """Where steps hand their outputs to the next and task assets keep their values: a folder every worker mounts at
    the same path when `MP_STEP_STORAGE_DIR` is set (unset: Dagster's default, `$DAGSTER_HOME/storage` of the
    machine)."""
    folder = os.environ.get(STEP_STORAGE_DIR_ENV, "").strip()
    return StepStorage(base_dir=folder or None)


def load_specs(source: str | None = None) -> LoadResult:
    """The workflows of `source` (a spec file; None: the workflow folders), re-read when the file changed."""
    stamp = None
    if source:
        try:
            stat = Path(source).stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            pass
    return _load_stamped(source, stamp)


@lru_cache(maxsize=64)
def _load_stamped(source: str | None, stamp: tuple[int, int] | None) -> LoadResult:
    return load_workflows([Path(source)] if source else None)


def get_job(name: str, source: str | None = None, version: str | None = None) -> dg.JobDefinition:
    """The job of workflow `name` (from `source`, a file, when given), for reconstruction in run workers.

    `version` (a digest of the spec) only tells Dagster's caches of reconstructed jobs apart, so a process
    that runs a workflow, edits it and runs it again builds the new job.
    """
    with _BUILT_LOCK:
        built = _built_jobs
        if built is not None and (name, source, version) in built:
            return built[(name, source, version)]
    loaded = load_specs(source)
    if name not in loaded.specs:
        known = ", ".join(sorted(loaded.specs)) or "none"
        raise KeyError(f"no workflow named {name!r} (loaded: {known})")
    spec = loaded.specs[name]
    with recursion_headroom(op_count(spec)):  # Dagster resolves the asset job's graph recursively, per op in a chain
        job = build_definitions(LoadResult({name: spec}, loaded.sources, [])).resolve_job_def(name)
    if built is not None:
        with _BUILT_LOCK:
            built[(name, source, version)] = job
    return job


_BUILT_LOCK = threading.Lock()
_built_jobs: dict[tuple[str, str | None, str | None], dg.JobDefinition] | None = None


@contextmanager
def jobs_built_once() -> Iterator[None]:
    """Within the block, `get_job` builds each job once in this process and hands the same definition back.

    Starting a run asks for its reconstructable job four times (the pointer's check, the run's arguments check, the
    run's plan, its execution), and each would rebuild the workflow's definitions (~0.1 s each). Outside the block
    every call builds afresh, so a process whose environment (provider, step storage) changes between runs builds
    its next run's job from the environment it then has."""
    global _built_jobs
    with _BUILT_LOCK:
        outer = _built_jobs is not None
        if not outer:
            _built_jobs = {}
    try:
        yield
    finally:
        if not outer:
            with _BUILT_LOCK:
                _built_jobs = None


def reconstructable_job(spec: WorkflowSpec, source: str | None) -> Any:
    """A ReconstructableJob of the workflow, rebuilt by `get_job` in every process that runs its steps."""
    version = hashlib.sha256(spec.to_yaml().encode()).hexdigest()[:16]
    return dg.build_reconstructable_job(__name__, "get_job", reconstructable_args=(spec.name, source, version))



LARGE_JOB_OPS = 300  # jobs of more ops are resolved when the code location loads (see `resolved_deep_jobs`)


def resolved_deep_jobs(definitions: dg.Definitions, specs: Iterable[WorkflowSpec]) -> dg.Definitions:
    """`definitions`, with the jobs of its large workflows already resolved, with room to recurse.

    Dagster resolves an asset job when it is first asked for (by the webserver, the daemon, `dagster definitions
    validate`) and walks the job's graph recursively, one frame per op along its longest chain, so a chain of
    ~1,000 tasks would pass Python's recursion limit wherever that happens. Resolving here, inside
    `recursion_headroom`, leaves the resolved jobs in the repository Dagster builds once from `definitions`."""
    deepest = max((op_count(spec) for spec in specs), default=0)
    if deepest > LARGE_JOB_OPS:
        with recursion_headroom(deepest):
            definitions.resolve_all_job_defs()
    return definitions


@dg.definitions
def defs() -> dg.Definitions:
    """Every workflow of the workflow folders, with the shared resources and sensors."""
    loaded = load_specs()
    return resolved_deep_jobs(build_definitions(loaded), loaded.specs.values())
