"""The Dagster internals mp_pipelines leans on, listed in one place with the versions they were read in.

`mp_pipelines.dagster_ext` is the only package of mp_pipelines allowed to import `dagster._*`
(mp_pipelines_tests/test_architecture.py enforces it). Everything it takes from there is named below:

* `PRIVATE_IMPORTS`: each name imported from a private Dagster module, with the members the code
  calls on it and the keyword arguments it passes;
* `OVERRIDES`: each Dagster / dagster-postgres method that a class here overrides, with the class that
  defines it in the pinned version and its parameters. An override of a method that Dagster renamed
  would never be called, silently: `checked_overrides` checks them when the class is created, and
  test_architecture.py checks the whole list;
* `INSTANCE_ATTRIBUTES`: private attributes that the stock classes set in `__init__` and that the
  pooled storages replace;
* `DAGSTER_POSTGRES_HELPERS`: undocumented helpers of dagster-postgres.

When the Dagster pin moves: update the versions below, run `python -m mp_pipelines.dagster_ext.compat`
(it prints what no longer matches; nothing means all still resolve), re-read the code of the changed
names (the executor follows `dagster/_core/executor/multiprocess.py` and, in `step_threads.py`,
`dagster/_core/execution/plan/execute_plan.py`; the storages and `pg_engines.py` follow
`dagster_postgres`), then update this list together with the code.

This module imports nothing from Dagster itself: the checks below import what they check.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

DAGSTER_VERSION = "1.13.27"
DAGSTER_POSTGRES_VERSION = "0.29.27"
WRITTEN_AGAINST = {"dagster": DAGSTER_VERSION, "dagster-postgres": DAGSTER_POSTGRES_VERSION}

_EXECUTOR = "mp_pipelines.dagster_ext.executor"
_STEP_THREADS = "mp_pipelines.dagster_ext.step_threads"
_TRACED = "mp_pipelines.dagster_ext.traced"
_FORKSERVER = "mp_pipelines.dagster_ext.forkserver"
_DELEGATING = "mp_pipelines.dagster_ext.delegating"
_POSTGRES = "mp_pipelines.dagster_ext.postgres"
_PG_ENGINES = "mp_pipelines.dagster_ext.pg_engines"
_SQLITE = "mp_pipelines.dagster_ext.sqlite"
_COMPUTE_LOGS = "mp_pipelines.dagster_ext.compute_logs"


@dataclass(frozen=True)
class Private:
    """`from <module> import <name>` in `used_by`; `members` are attributes of it the code uses;
    `keywords` are keyword arguments the code passes when calling it. A name imported by two modules is
    listed once for each, with what that module uses."""

    module: str
    name: str
    used_by: str
    members: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Override:
    """`by` (module:Class here) overrides `method`, defined by `base` (module:Class) in the pinned version.

    `parameters` are the base method's parameter names, `self` included; None for a property.
    """

    base: str
    method: str
    by: str
    parameters: tuple[str, ...] | None

    @property
    def path(self) -> str:
        return f"{self.base.replace(':', '.')}.{self.method}"


PRIVATE_IMPORTS: tuple[Private, ...] = (
    # executor.py: the concurrent executor (orchestration loop of multiprocess.py)
    Private("dagster._core.definitions.executor_definition", "IN_PROC_CONFIG", _EXECUTOR),
    Private("dagster._core.definitions.executor_definition", "MULTI_PROC_CONFIG", _EXECUTOR),
    Private("dagster._core.definitions.executor_definition", "multiple_process_executor_requirements", _EXECUTOR),
    Private("dagster._core.errors", "DagsterExecutionInterruptedError", _EXECUTOR),
    Private("dagster._core.events", "DagsterEvent", _EXECUTOR, members=("engine_event", "capture_logs")),
    Private("dagster._core.events", "EngineEventData", _EXECUTOR, members=("interrupted", "in_process")),
    Private("dagster._core.execution.api", "ExecuteRunWithPlanIterable", _EXECUTOR,
            keywords=("execution_plan", "iterator", "execution_context_manager")),
    Private("dagster._core.execution.compute_logs", "create_compute_log_file_key", _EXECUTOR),
    Private("dagster._core.execution.context.system", "PlanExecutionContext", _EXECUTOR, members=(
        "instance", "dagster_run", "run_id", "retry_mode", "step_dependency_config", "for_step")),
    Private("dagster._core.execution.context.system", "PlanOrchestrationContext", _EXECUTOR, members=(
        "execution_plan", "job", "retry_mode", "run_config", "dagster_run", "instance", "raise_on_error",
        "output_capture")),
    Private("dagster._core.execution.context_creation_job", "PlanExecutionContextManager", _EXECUTOR, keywords=(
        "job", "retry_mode", "execution_plan", "run_config", "dagster_run", "instance", "raise_on_error",
        "output_capture", "step_dependency_config")),
    Private("dagster._core.execution.plan.active", "ActiveExecution", _EXECUTOR, members=(
        "is_complete", "check_for_interrupts", "get_steps_to_execute", "concurrency_event_iterator",
        "get_known_state", "sleep_interval", "handle_event", "verify_complete", "plan_events_iterator",
        "mark_interrupted", "__enter__", "__exit__"), keywords=(
        "retry_mode", "max_concurrent", "tag_concurrency_limits", "instance_concurrency_context",
        "step_dependency_config")),
    Private("dagster._core.execution.plan.instance_concurrency_context", "InstanceConcurrencyContext", _EXECUTOR,
            members=("__enter__", "__exit__")),
    Private("dagster._core.execution.plan.objects", "ErrorSource", _EXECUTOR, members=(
        "INTERRUPT", "FRAMEWORK_ERROR")),
    Private("dagster._core.execution.plan.plan", "ExecutionPlan", _EXECUTOR, members=(
        "get_steps_to_execute_in_topo_order", "step_keys_to_execute")),
    Private("dagster._core.execution.retries", "RetryMode", _EXECUTOR),
    Private("dagster._core.execution.retries", "get_retries_config", _EXECUTOR),
    Private("dagster._core.execution.step_dependency_config", "StepDependencyConfig", _EXECUTOR,
            members=("default",)),
    Private("dagster._core.execution.step_dependency_config", "get_step_dependency_config_field", _EXECUTOR),
    Private("dagster._core.execution.tags", "get_tag_concurrency_limits_config", _EXECUTOR),
    Private("dagster._core.executor.base", "Executor", _EXECUTOR),
    Private("dagster._utils.error", "serializable_error_info_from_exc_info", _EXECUTOR),
    # step_threads.py: the concurrent executor's step threads (step path of execute_plan.py)
    Private("dagster._core.events", "DagsterEvent", _STEP_THREADS, members=(
        "is_step_success", "is_step_failure", "is_step_up_for_retry", "is_successful_output",
        "is_handled_output", "step_key")),
    Private("dagster._core.execution.context.system", "StepExecutionContext", _STEP_THREADS, members=("step",)),
    Private("dagster._core.execution.plan.active", "ActiveExecution", _STEP_THREADS, members=("handle_event",)),
    Private("dagster._core.execution.plan.execute_plan", "_trigger_hook", _STEP_THREADS),
    Private("dagster._core.execution.plan.execute_plan", "dagster_event_sequence_for_step", _STEP_THREADS),
    Private("dagster._core.execution.plan.objects", "ErrorSource", _STEP_THREADS, members=("UNEXPECTED_ERROR",)),
    Private("dagster._core.execution.plan.objects", "step_failure_event_from_exc_info", _STEP_THREADS,
            keywords=("error_source",)),
    # postgres.py: the pooled PostgreSQL storages
    Private("dagster._config.config_schema", "UserConfigSchema", _POSTGRES),
    Private("dagster._core.storage.base_storage", "DagsterStorage", _POSTGRES, members=(
        "event_log_storage", "run_storage", "schedule_storage")),
    Private("dagster._core.storage.config", "pg_config", _POSTGRES),
    Private("dagster._core.storage.event_log.migration", "ASSET_KEY_INDEX_COLS", _POSTGRES),
    Private("dagster._core.storage.event_log.schema", "ConcurrencySlotsTable", _POSTGRES),
    Private("dagster._serdes", "ConfigurableClass", _POSTGRES, members=("config_type", "from_config_value")),
    Private("dagster._serdes", "ConfigurableClassData", _POSTGRES),
    Private("dagster._utils.concurrency", "ConcurrencySlotStatus", _POSTGRES, members=("CLAIMED", "BLOCKED")),
    # sqlite.py: Dagster's SQLite storages with connections kept open
    Private("dagster._config.config_schema", "UserConfigSchema", _SQLITE),
    Private("dagster._core.storage.base_storage", "DagsterStorage", _SQLITE),
    Private("dagster._core.storage.event_log.sqlite.sqlite_event_log", "SqliteEventLogStorage", _SQLITE, members=(
        "_initdb", "conn_string_for_shard", "path_for_shard", "run_connection", "index_connection", "_event_to_row")),
    Private("dagster._core.storage.event_log.sqlite.sqlite_event_log", "INDEX_SHARD_NAME", _SQLITE),
    Private("dagster._core.events", "ASSET_EVENTS", _SQLITE),
    Private("dagster._core.events", "ASSET_CHECK_EVENTS", _SQLITE),
    Private("dagster._core.events", "EVENT_TYPE_TO_PIPELINE_RUN_STATUS", _SQLITE),
    Private("dagster._core.events.log", "EventLogEntry", _SQLITE),
    Private("dagster._core.storage.event_log.schema", "SqlEventLogStorageTable", _SQLITE, members=("insert",)),
    Private("dagster._core.storage.runs.sqlite.sqlite_run_storage", "SqliteRunStorage", _SQLITE, members=(
        "from_local",)),
    Private("dagster._core.storage.schedules.sqlite.sqlite_schedule_storage", "SqliteScheduleStorage", _SQLITE,
            members=("from_local",)),
    Private("dagster._core.storage.sqlite", "SQLITE_BUSY_TIMEOUT_SECONDS", _SQLITE),
    Private("dagster._core.storage.sqlite", "create_db_conn_string", _SQLITE),
    Private("dagster._core.storage.sql", "get_alembic_config", _SQLITE),
    Private("dagster._core.storage.event_log.schema", "SqlEventLogStorageMetadata", _SQLITE, members=("create_all",)),
    Private("dagster._core.storage.sqlite_storage", "DagsterSqliteStorage", _SQLITE, members=(
        "from_local", "event_log_storage", "run_storage", "schedule_storage", "register_instance", "dispose")),
    Private("dagster._serdes", "ConfigurableClassData", _SQLITE),
    # compute_logs.py: Dagster's local compute logs, mirrored to the terminal by a thread
    Private("dagster._core.storage.compute_log_manager", "CapturedLogContext", _COMPUTE_LOGS),
    Private("dagster._core.storage.compute_log_manager", "ComputeIOType", _COMPUTE_LOGS, members=("STDOUT", "STDERR")),
    Private("dagster._core.storage.local_compute_log_manager", "IO_TYPE_EXTENSION", _COMPUTE_LOGS),
    Private("dagster._core.storage.local_compute_log_manager", "LocalComputeLogManager", _COMPUTE_LOGS, members=(
        "get_captured_local_path", "complete_artifact_path")),
    Private("dagster._serdes", "ConfigurableClassData", _COMPUTE_LOGS),
)

_EVENT_LOG = "dagster_postgres.event_log.event_log:PostgresEventLogStorage"
_RUN = "dagster_postgres.run_storage.run_storage:PostgresRunStorage"
_SCHEDULE = "dagster_postgres.schedule_storage.schedule_storage:PostgresScheduleStorage"
_POOLED_EVENT_LOG = f"{_POSTGRES}:PooledPostgresEventLogStorage"
_POOLED_RUN = f"{_POSTGRES}:PooledPostgresRunStorage"
_POOLED_SCHEDULE = f"{_POSTGRES}:PooledPostgresScheduleStorage"
_SQLITE_EVENT_LOG = "dagster._core.storage.event_log.sqlite.sqlite_event_log:SqliteEventLogStorage"
_SQLITE_RUN = "dagster._core.storage.runs.sqlite.sqlite_run_storage:SqliteRunStorage"
_SQLITE_SCHEDULE = "dagster._core.storage.schedules.sqlite.sqlite_schedule_storage:SqliteScheduleStorage"
_STOCK_INIT = ("self", "postgres_url", "should_autocreate_tables", "inst_data", "token_provider")
_OPTIMIZE = ("self", "statement_timeout", "pool_recycle", "max_overflow")

OVERRIDES: tuple[Override, ...] = (
    # The one private method overridden: the atomic slot claim (see PooledPostgresEventLogStorage).
    Override("dagster._core.storage.event_log.sql_event_log:SqlEventLogStorage", "_claim_concurrency_slot",
             _POOLED_EVENT_LOG, ("self", "concurrency_key", "run_id", "step_key")),
    # Public methods, listed because a rename would also leave the override silently unused.
    Override(_EVENT_LOG, "has_table", _POOLED_EVENT_LOG, ("self", "table_name")),
    Override(_EVENT_LOG, "__init__", _POOLED_EVENT_LOG, _STOCK_INIT),
    Override(_RUN, "__init__", _POOLED_RUN, _STOCK_INIT),
    Override(_SCHEDULE, "__init__", _POOLED_SCHEDULE, _STOCK_INIT),
    Override(_EVENT_LOG, "optimize_for_webserver", _POOLED_EVENT_LOG, _OPTIMIZE),
    Override(_RUN, "optimize_for_webserver", _POOLED_RUN, _OPTIMIZE),
    Override(_SCHEDULE, "optimize_for_webserver", _POOLED_SCHEDULE, _OPTIMIZE),
    Override(_EVENT_LOG, "dispose", _POOLED_EVENT_LOG, ("self",)),
    Override("dagster._core.storage.runs.base:RunStorage", "dispose", _POOLED_RUN, ("self",)),
    Override("dagster._core.storage.schedules.base:ScheduleStorage", "dispose", _POOLED_SCHEDULE, ("self",)),
    # the SQLite storages that keep their connections open (sqlite.py)
    Override(_SQLITE_EVENT_LOG, "_connect", f"{_SQLITE}:PooledSqliteEventLogStorage", ("self", "shard")),
    Override(_SQLITE_EVENT_LOG, "store_event", f"{_SQLITE}:PooledSqliteEventLogStorage", ("self", "event")),
    Override(_SQLITE_EVENT_LOG, "__init__", f"{_SQLITE}:PooledSqliteEventLogStorage", ("self", "base_dir", "inst_data")),
    Override(_SQLITE_EVENT_LOG, "dispose", f"{_SQLITE}:PooledSqliteEventLogStorage", ("self",)),
    Override(_SQLITE_EVENT_LOG, "wipe", f"{_SQLITE}:PooledSqliteEventLogStorage", ("self",)),
    Override(_SQLITE_EVENT_LOG, "_initdb", f"{_SQLITE}:PooledSqliteEventLogStorage", ("self", "engine", "for_index_shard")),
    Override(_SQLITE_RUN, "from_local", f"{_SQLITE}:PooledSqliteRunStorage", ("cls", "base_dir", "inst_data")),
    Override(_SQLITE_SCHEDULE, "from_local", f"{_SQLITE}:PooledSqliteScheduleStorage", ("cls", "base_dir", "inst_data")),
    Override(_SQLITE_SCHEDULE, "connect", f"{_SQLITE}:PooledSqliteScheduleStorage", ("self",)),
    Override(_SQLITE_SCHEDULE, "__init__", f"{_SQLITE}:PooledSqliteScheduleStorage", ("self", "conn_string", "inst_data")),
    Override("dagster._core.storage.schedules.base:ScheduleStorage", "dispose",
             f"{_SQLITE}:PooledSqliteScheduleStorage", ("self",)),
    Override("dagster._core.storage.sqlite_storage:DagsterSqliteStorage", "schedule_storage_data",
             f"{_SQLITE}:PooledSqliteStorage", None),
    Override(_SQLITE_RUN, "connect", f"{_SQLITE}:PooledSqliteRunStorage", ("self",)),
    Override(_SQLITE_RUN, "__init__", f"{_SQLITE}:PooledSqliteRunStorage", ("self", "conn_string", "inst_data")),
    Override("dagster._core.storage.runs.base:RunStorage", "dispose", f"{_SQLITE}:PooledSqliteRunStorage", ("self",)),
    Override("dagster._core.storage.sqlite_storage:DagsterSqliteStorage", "__init__", f"{_SQLITE}:PooledSqliteStorage",
             ("self", "base_dir", "inst_data")),
    Override("dagster._core.storage.sqlite_storage:DagsterSqliteStorage", "event_storage_data",
             f"{_SQLITE}:PooledSqliteStorage", None),
    Override("dagster._core.storage.sqlite_storage:DagsterSqliteStorage", "run_storage_data",
             f"{_SQLITE}:PooledSqliteStorage", None),
    # the compute log manager whose captures mirror to the terminal from a thread (compute_logs.py)
    Override("dagster._core.storage.local_compute_log_manager:LocalComputeLogManager", "capture_logs",
             f"{_COMPUTE_LOGS}:MirroredComputeLogManager", ("self", "log_key")),
    Override("dagster._core.storage.local_compute_log_manager:LocalComputeLogManager", "from_config_value",
             f"{_COMPUTE_LOGS}:MirroredComputeLogManager", ("cls", "inst_data", "config_value")),
    Override("dagster._core.storage.local_compute_log_manager:LocalComputeLogManager", "config_type",
             f"{_COMPUTE_LOGS}:MirroredComputeLogManager", ("cls",)),
    # concurrent executor
    Override("dagster._core.executor.base:Executor", "execute", f"{_EXECUTOR}:ConcurrentExecutor",
             ("self", "plan_context", "execution_plan")),
    Override("dagster._core.executor.base:Executor", "retries", f"{_EXECUTOR}:ConcurrentExecutor", None),
    Override("dagster._core.executor.base:Executor", "step_dependency_config", f"{_EXECUTOR}:ConcurrentExecutor",
             None),
    # the run span around whichever executor a run chose (traced.py)
    Override("dagster._core.executor.base:Executor", "execute", f"{_TRACED}:TracedExecutor",
             ("self", "plan_context", "execution_plan")),
    # the multiprocess executor on a forkserver of the current environment (forkserver.py)
    Override("dagster._core.executor.base:Executor", "execute", f"{_FORKSERVER}:CurrentEnvironmentExecutor",
             ("self", "plan_context", "execution_plan")),
    # what the two wrapping executors above hand on to the executor they wrap (delegating.py)
    Override("dagster._core.executor.base:Executor", "execute", f"{_DELEGATING}:DelegatingExecutor",
             ("self", "plan_context", "execution_plan")),
    Override("dagster._core.executor.base:Executor", "retries", f"{_DELEGATING}:DelegatingExecutor", None),
    Override("dagster._core.executor.base:Executor", "step_dependency_config", f"{_DELEGATING}:DelegatingExecutor",
             None),
)

# Private attributes set by the stock `__init__` (with should_autocreate_tables=False it opens no connection)
# that the pooled storages replace: every connection the stock code opens comes from `_engine`.
INSTANCE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    (_EVENT_LOG, "_engine"),
    (_RUN, "_engine"),
    (_SCHEDULE, "_engine"),
)

# Undocumented dagster-postgres helpers (public module names, no API promise) and the stock methods the
# pooled storages call.
DAGSTER_POSTGRES_HELPERS: tuple[Private, ...] = (
    Private("dagster_postgres.utils", "create_pg_engine", _PG_ENGINES, keywords=("isolation_level",)),
    Private("dagster_postgres.utils", "get_token_provider_from_config", _POSTGRES),
    Private("dagster_postgres.utils", "pg_url_from_config", _POSTGRES),
    Private("dagster_postgres.utils", "retry_pg_connection_fn", _POSTGRES),
    Private("dagster_postgres.utils", "set_pg_statement_timeout", _PG_ENGINES),
    Private("dagster_postgres.event_log.event_log", "PostgresEventLogStorage", _POSTGRES, members=(
        "has_secondary_index", "index_connection")),
)


class DagsterCompatError(RuntimeError):
    """Installed Dagster no longer has an internal that mp_pipelines.dagster_ext was written against."""


def installed_version(distribution: str = "dagster") -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_note() -> str:
    """'written against dagster 1.13.27 / dagster-postgres 0.29.27; installed: dagster X / dagster-postgres Y'."""
    written = " / ".join(f"{dist} {version}" for dist, version in WRITTEN_AGAINST.items())
    installed = " / ".join(f"{dist} {installed_version(dist)}" for dist in WRITTEN_AGAINST)
    return f"mp_pipelines.dagster_ext was written against {written}; installed: {installed}"


def resolve(module: str, qualname: str) -> Any:
    """Import `module` and return its attribute `qualname` (dotted for nested names)."""
    value: Any = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def _resolve_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    return resolve(module, qualname)


def _parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    function = getattr(function, "__func__", function)  # a classmethod's function, `cls` included
    return list(inspect.signature(function).parameters.values())


def _accepts(override: Callable[..., Any], names: tuple[str, ...]) -> bool:
    """True if `override` can be called as the base method with parameters `names` is."""
    params = _parameters(override)
    kinds = {p.kind for p in params}
    if inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds:
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if [p.name for p in positional[: len(names)]] != list(names):
        return False
    extra = positional[len(names):] + [p for p in params if p.kind is p.KEYWORD_ONLY]
    return all(p.default is not p.empty for p in extra)


def check_override(cls: type, override: Override) -> None:
    """Raise DagsterCompatError unless `override.method` of `cls` still overrides a method of a base class
    of `cls` with the parameters `override.parameters` (for a property: a property)."""
    name = override.method
    where = f"{cls.__module__}.{cls.__qualname__}.{name} overrides {override.path}"
    owners = [klass for klass in cls.__mro__ if name in vars(klass)]
    defining = next((klass for klass in owners if not _is_ours(klass)), object)
    if defining is object:
        raise DagsterCompatError(f"{where}, which no base class of {cls.__qualname__} defines any more, so the "
                                 f"override would never be called. {versions_note()}.")
    if not _is_ours(owners[0]):
        raise DagsterCompatError(f"{where}, but {cls.__qualname__} does not define it. {versions_note()}.")
    ours, theirs = vars(owners[0])[name], vars(defining)[name]
    if override.parameters is None:
        if not isinstance(theirs, property):
            raise DagsterCompatError(f"{where}, which is no longer a property on {defining.__qualname__}. "
                                     f"{versions_note()}.")
        return
    found = tuple(p.name for p in _parameters(theirs))
    if found != override.parameters:
        raise DagsterCompatError(f"{where}: its parameters are now {found}, not {override.parameters}. "
                                 f"{versions_note()}.")
    if not _accepts(ours, override.parameters):
        raise DagsterCompatError(f"{where}, but does not accept its parameters {override.parameters}.")


def _is_ours(klass: type) -> bool:
    return klass.__module__.split(".")[0] == "mp_pipelines"


_C = TypeVar("_C", bound=type)


def checked_overrides(cls: _C) -> _C:
    """Class decorator: check, when the class is created, every entry of OVERRIDES made by this class."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    for override in OVERRIDES:
        if override.by == path:
            check_override(cls, override)
    return cls


def _check_private(private: Private) -> list[str]:
    try:
        value = resolve(private.module, private.name)
    except (ImportError, AttributeError) as exc:
        return [f"{private.path} (used by {private.used_by}) is gone: {exc}"]
    problems = [f"{private.path}.{member} (used by {private.used_by}) is gone"
                for member in private.members if not _has_member(value, member)]
    if private.keywords:
        target = value.__init__ if inspect.isclass(value) else value
        params = {p.name: p for p in _parameters(target)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            problems += [f"{private.path} (used by {private.used_by}) no longer takes the keyword {keyword!r}"
                         for keyword in private.keywords if keyword not in params]
    return problems


def _has_member(value: Any, member: str) -> bool:
    if hasattr(value, member):
        return True
    # NamedTuple / dataclass fields and annotated attributes of instances
    fields = getattr(value, "_fields", ()) or getattr(value, "__dataclass_fields__", {})
    annotations: dict[str, Any] = {}
    for klass in getattr(value, "__mro__", ()):
        annotations.update(getattr(klass, "__annotations__", {}))
    return member in fields or member in annotations


def problems() -> list[str]:
    """Everything listed here that the installed Dagster no longer matches (empty when all is well)."""
    found: list[str] = []
    for private in (*PRIVATE_IMPORTS, *DAGSTER_POSTGRES_HELPERS):
        found += _check_private(private)
    for override in OVERRIDES:
        try:
            base, cls = _resolve_class(override.base), _resolve_class(override.by)
        except (ImportError, AttributeError) as exc:
            found.append(f"{override.path}: {exc}")
            continue
        if override.method not in vars(base):
            found.append(f"{override.path}: {base.__qualname__} no longer defines {override.method} "
                         "(renamed, removed or moved to another class)")
        try:
            check_override(cls, override)
        except DagsterCompatError as exc:
            found.append(str(exc))
    for path, attribute in INSTANCE_ATTRIBUTES:
        try:
            storage = _resolve_class(path)("postgresql://unused@127.0.0.1:1/unused", False)
        except Exception as exc:  # noqa: BLE001 - any failure is a finding
            found.append(f"{path.replace(':', '.')}(url, False) failed: {exc!r}")
            continue
        if not hasattr(storage, attribute):
            found.append(f"{path.replace(':', '.')} instances no longer have {attribute}")
    return found


if __name__ == "__main__":
    print(versions_note())
    for problem in problems():
        print("-", problem)
