"""Ops for prompt tasks: the inputs op, plain task ops, and the helpers every op builder shares."""


import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterable, Iterator, Mapping, TypeVar

import dagster as dg

from mp_pipelines.calls.batch import BatchCollector
from mp_pipelines.calls.budget import unshared_account
from mp_pipelines.calls.call import CallScope
from mp_pipelines.calls.deadline import TaskTimeout
from mp_pipelines.calls.fleet import FleetLimits
from mp_pipelines.calls.fleet_stores import LIMITS_REDIS_URL_ENV, open_shared_limits
from mp_pipelines.calls.loop import shared_loop
from mp_pipelines.calls.models import ModelRouter
from mp_pipelines.calls.pricing import current_prices, unpriced_under_budget
from mp_pipelines.calls.retry import retry_budget
from mp_pipelines.calls.store import open_store
from mp_pipelines.calls.usage import Usage
from mp_pipelines.factory.names import (
    BUDGET_RESOURCE_KEY,
    INPUTS_OP,
    LLM_RESOURCE_KEY,
    PROMPT_RESOURCE_KEYS,
    SPREAD_EXECUTORS,
    WORKFLOW_TAG,
    executor_kind,
    inputs_step,
    node_name,
    task_step,
)
from mp_pipelines.factory.observe import observed
from mp_pipelines.factory.partitions import inbox_root
from mp_pipelines.factory.resources import RunBudget
from mp_pipelines.llm.types import ChatModel, LimitSettings, LLMError
from mp_pipelines.spec.inputs import coerce_input
from mp_pipelines.spec.models import RESERVED_SEPARATOR, BatchSettings, BudgetSpec, InputSpec, TaskSpec, WorkflowSpec
from mp_pipelines.spec.paths import InputPathError, input_roots
from mp_pipelines.spec.problems import WorkflowValidationError
from mp_pipelines.spec.providers import declared_providers
from mp_pipelines.spec.size_limits import SettingError
from mp_pipelines.spec.templates import TemplateError
from mp_pipelines.spec.versions import task_code_version
from mp_pipelines.tasks.runner import TaskRun, build_context, condition_holds, preview, run_task

_CONFIG_TYPES = {
    "string": dg.String,
    "integer": dg.Int,
    "number": dg.Float,
    "boolean": dg.Bool,
    # A list is checked once, by the inputs op (coerce_input: a list, a JSON array or comma-separated text), not element
    # by element by each of Dagster's validations of the run config (several per run: ~0.15 ms a prompt at 1,000 items).
    "list": dg.Any,
    "table": dg.String,
}

Compute = Callable[[dg.OpExecutionContext, Mapping[str, Any]], Iterator[Any]]


def make_op(spec: WorkflowSpec, name: str, compute: Compute, *, step: str, ins: Mapping[str, dg.In] | None = None,
            outs: Mapping[str, dg.Out] | None = None, **kwargs: Any) -> dg.OpDefinition:
    """An op from a plain `(context, inputs) -> events` function, named `<workflow>__<name>`.

    Op definition names must be unique in a code location (Dagster's asset job holds every workflow's assets).
    `step` is the step key the op runs as (names.py): the op's own name at the top level of the job, `<graph>.<alias>`
    inside a fan-out's or loop's graph.
    """
    prompts = kwargs.get("required_resource_keys") == PROMPT_RESOURCE_KEYS
    return dg.OpDefinition(compute_fn=observed(spec, step, compute, prompts=prompts), name=node_name(node_prefix(spec), name),
                           ins=dict(ins or {}), outs=dict(outs or {"result": dg.Out(dg.Any)}), **kwargs)


def node_prefix(spec: WorkflowSpec) -> str:
    """What its nodes' names start with: the workflow's name, or `caller__task…` for a workflow another one runs."""
    return RESERVED_SEPARATOR.join(spec.asset_prefix)


def asset_key(spec: WorkflowSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([*spec.asset_prefix, name])


def input_field(spec: InputSpec) -> dg.Field:
    """The run-config field of one workflow input, with its default so the Launchpad shows it."""
    kind = _CONFIG_TYPES[spec.type]
    description = spec.description or None
    if spec.type == "list":
        description = " ".join(filter(None, [description, "A list: strings or objects (or a JSON array as text)."]))
    if spec.required:
        return dg.Field(kind, is_required=True, description=description)
    return dg.Field(kind, default_value=spec.default, is_required=False, description=description)


def build_inputs_op(spec: WorkflowSpec, base_dir: Path | None = None) -> dg.OpDefinition:
    """The op whose run config holds the workflow inputs; it checks and passes them on.

    Relative table paths resolve against the working folder, then against `base_dir` (the spec's folder); every
    table path must lie inside the allowed input roots, checked here, in the run's first step, before any step reads
    it, however the run was started (CLI, Launchpad, GraphQL, schedule, sensor).
    """

    def compute(context: dg.OpExecutionContext, _: Mapping[str, Any]) -> Iterator[Any]:
        values = {}
        for name, input_spec in spec.inputs.items():
            try:
                values[name] = coerce_input(input_spec.type, context.op_config[name], name)
            except SettingError as exc:
                raise dg.Failure(f"workflow {spec.name!r}: environment setting: {exc}", allow_retries=False,
                                 metadata={"error_kind": "setting"}) from None
            except ValueError as exc:
                raise dg.Failure(f"workflow {spec.name!r}: {exc}", allow_retries=False) from None
            if input_spec.type == "table":
                values[name] = checked_table_path(spec, name, values[name], base_dir)
        yield dg.Output(values, metadata={name: dg.MetadataValue.text(preview(v, 200)) for name, v in values.items()})

    schema = {name: input_field(s) for name, s in spec.inputs.items()}
    return make_op(spec, INPUTS_OP, compute, step=inputs_step(spec.name), config_schema=schema,
                   description=f"Inputs of workflow {spec.name}.", tags={WORKFLOW_TAG: spec.name})


def checked_table_path(spec: WorkflowSpec, name: str, value: str, base_dir: Path | None) -> str:
    """The real path of table input `name` once it is inside the allowed input roots; a Failure naming the input,
    the path and the roots otherwise (nothing of it has been read)."""
    roots = input_roots(workflow_dir=base_dir, inbox=inbox_root())
    try:
        return str(roots.resolve(value, what=f"input {name!r}: path {value!r}", base_dir=base_dir))
    except InputPathError as exc:
        raise dg.Failure(f"workflow {spec.name!r}: {exc}", allow_retries=False) from None


def retry_policy(task: TaskSpec) -> dg.RetryPolicy | None:
    """The task's `retries` as a Dagster RetryPolicy (step-level retries)."""
    if task.retries is None:
        return None
    backoff = {"linear": dg.Backoff.LINEAR, "exponential": dg.Backoff.EXPONENTIAL}.get(task.retries.backoff or "")
    jitter = {"full": dg.Jitter.FULL, "plus_minus": dg.Jitter.PLUS_MINUS}.get(task.retries.jitter or "")
    return dg.RetryPolicy(max_retries=task.retries.max_retries, delay=task.retries.delay, backoff=backoff, jitter=jitter)


def chat_model(context: dg.OpExecutionContext) -> ChatModel:
    """The run's LLM resource, as the call path sees it."""
    return getattr(context.resources, LLM_RESOURCE_KEY)


def llm_pool(provider: str, spec: WorkflowSpec, task: TaskSpec) -> str:
    """The Dagster concurrency pool of a prompt op: one per provider and model, shared by every run."""
    return f"llm/{provider}/{spec.settings_for(task).model or 'default'}"


def call_scope(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec, *, fanout: str | None = None,
               breadth: int | None = None, online: bool = False) -> CallScope:
    """Everything a call of this op runs under: the run's workflow `limits` over the resource's defaults, its
    budget, the task's cache policy, and the run family for checkpoints.

    A budget that would not hold here (see `budget_refusal`) fails the step before its first call."""
    llm = chat_model(context)
    run_limits = None
    if spec.limits is not None:
        run_limits = llm.limit_settings().merged(LimitSettings(**spec.limits.model_dump()))
    resource: RunBudget = getattr(context.resources, BUDGET_RESOURCE_KEY)
    try:
        current_prices()  # a bad MP_PRICES_FILE fails the step here, before any call is paid for
    except SettingError as exc:
        raise setting_failure(task.name, exc) from None
    budget = resource.over(spec)
    store, no_store = open_store(context.instance)
    refusal = budget_refusal(budget, context.run_config, no_store, [spec.settings_for(task).model or llm.default_model])
    if refusal is not None:
        raise dg.Failure(f"task {task.name}: {refusal}", metadata={"error_kind": "budget"}, allow_retries=False)
    batch = spec.batch_settings(task, "online") if online else batch_settings(context, spec, task)
    if batch.mode == "batch":
        from mp_pipelines.calls.batch_send import check_settings  # the sending half loads with the first batch

        try:
            check_settings()  # a bad MP_BATCH_* fails the step here as a setting, before any batch is sent
        except SettingError as exc:
            raise setting_failure(task.name, exc) from None
    if batch.mode == "batch" and budget.max_cost_usd is not None and spec.settings_for(task).max_tokens is None:
        raise dg.Failure(f"task {task.name} runs in batch mode under a cost budget (max_cost_usd) and needs "
                         "max_tokens: a batch's cost is admitted before it is sent, with max_tokens as the bound of "
                         "each answer; set max_tokens on the task or run it with --mode online",
                         metadata={"error_kind": "budget"}, allow_retries=False)
    run = context.dagster_run
    try:
        router = ModelRouter(llm, declared_providers(spec))
        retry_budget(task.retries)  # a bad MP_RETRY_BASE_DELAY fails here, before any call
    except SettingError as exc:
        raise setting_failure(task.name, exc) from None
    except (WorkflowValidationError, ValueError) as exc:  # e.g. MP_PROVIDERS_FILE changed since the workflow loaded
        raise dg.Failure(f"task {task.name}: {exc}", metadata={"error_kind": "bad_request"},
                         allow_retries=False) from None
    return CallScope(resource.run_calls(context.run_id), run_limits, fanout, breadth, budget=budget,
                     store=store, cache_policy=spec.cache_policy(task),
                     root_run_id=run.root_run_id or run.run_id,
                     resuming=reads_checkpoint(context),  # a retried step: answers so far stand
                     step_retry=context.retry_number > 0 and not is_resume(run),
                     workflow=spec.name, task=task.name, repair_attempts=task.repair_attempts, task_timeout=task.timeout,
                     retry_budget=retry_budget(task.retries), fallback=spec.fallback_for(task), router=router,
                     log=context.log, fleet=fleet_limits(context, task.name),
                     batch=BatchCollector(batch, context.log) if batch.mode == "batch" else None)


T = TypeVar("T")

FLEET_LIMITS_ENV = "MP_FLEET_LIMITS"
FLEET_MODES = ("auto", "on", "off")
_FLEETS: dict[tuple[str, int], FleetLimits] = {}
_FLEETS_LOCK = threading.Lock()


def fleet_mode() -> str:
    """`MP_FLEET_LIMITS`: auto (the default), on or off; anything else is a clear error."""
    mode = os.environ.get(FLEET_LIMITS_ENV, "").strip().lower() or "auto"
    if mode not in FLEET_MODES:
        raise SettingError(f"{FLEET_LIMITS_ENV}={mode!r} is not valid: it must be one of {', '.join(FLEET_MODES)}, "
                           "or unset for auto.")
    return mode


def fleet_limits(context: dg.OpExecutionContext, task: str) -> FleetLimits | None:
    """The limits this step shares with the other processes of its run (and every run using the same storage).

    `MP_FLEET_LIMITS=auto` shares them when the run's steps are spread over processes (the multiprocess and
    Celery executors) or `MP_LIMITS_REDIS_URL` is set; `on` always, `off` never. They live in Redis at
    `MP_LIMITS_REDIS_URL` when set, else in the response store's database (the instance's PostgreSQL, or the
    SQLite file next to a local instance). Without either, limits stay per process (None)."""
    try:
        mode = fleet_mode()
    except SettingError as exc:
        raise setting_failure(task, exc) from None
    redis_url = os.environ.get(LIMITS_REDIS_URL_ENV, "").strip()
    if mode == "off" or (mode == "auto" and not redis_url and executor_kind(context.run_config) not in SPREAD_EXECUTORS):
        return None
    store = None if redis_url else open_store(context.instance)[0]
    if not redis_url and store is None:
        context.log.warning("limits and breadth cannot be shared by the run's processes: there is no response store "
                            f"(set {LIMITS_REDIS_URL_ENV}, or give the instance a database); each process keeps its own")
        return None
    where = redis_url or store.url  # type: ignore[union-attr]
    with _FLEETS_LOCK:
        key = (where, os.getpid())
        if key not in _FLEETS:
            try:
                _FLEETS[key] = FleetLimits(open_shared_limits(redis_url or None, None if redis_url else store.engine))
            except Exception as exc:  # noqa: BLE001 - whatever stops it, the step cannot keep the fleet's limits
                setting = LIMITS_REDIS_URL_ENV if redis_url else "the response store's database"
                raise dg.Failure(f"the shared limits in {setting} cannot be reached: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                 allow_retries=True) from None
        return _FLEETS[key]


def reads_checkpoint(context: dg.OpExecutionContext) -> bool:
    """Whether calls of this step first look for their answers in the run family's checkpoint: when the run
    resumes an earlier one, when the step is tried again, and on Celery, where a step whose worker died is
    delivered again to another worker (what it answered before the loss is not asked again)."""
    return (is_resume(context.dagster_run) or context.retry_number > 0
            or executor_kind(context.run_config) == "celery")


def batch_settings(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec) -> BatchSettings:
    """The task's batch policy, with the run's mode (`--mode`, run config resources.llm.config.mode) over its own."""
    mode = getattr(chat_model(context), "mode", None)
    return spec.batch_settings(task, mode if mode in ("batch", "online") else None)


def run_batch_settings(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec) -> BatchSettings:
    """`batch_settings` for an op without the LLM resource, from the run config (a fan-out's items op)."""
    resources = context.run_config.get("resources") or {}
    mode = ((resources.get(LLM_RESOURCE_KEY) or {}).get("config") or {}).get("mode")
    return spec.batch_settings(task, mode if mode in ("batch", "online") else None)


def budget_refusal(budget: BudgetSpec, run_config: Mapping[str, Any], no_store: str | None,
                   models: Iterable[str]) -> str | None:
    """Why `budget` would not hold for calls to `models`, or None.

    Without a store (`no_store` says why) the account lives in each process, so it holds the run only when every
    step runs in one process: the step processes of the multiprocess or Celery executor would each spend the whole
    budget. A cost
    limit cannot be measured against a model that has no price."""
    if budget.unlimited:
        return None
    if no_store is not None and executor_kind(run_config) in SPREAD_EXECUTORS:
        return unshared_account(budget, no_store, executor_kind(run_config))
    for model in sorted(set(models)):
        reason = unpriced_under_budget(model, budget.max_cost_usd)
        if reason is not None:
            return reason
    return None


def setting_failure(label: str, exc: SettingError) -> dg.Failure:
    """The step's failure for an MP_* variable that cannot be used: it names the variable (the workflow is not at
    fault), and retrying the step cannot help."""
    return dg.Failure(f"task {label}: environment setting: {exc}", metadata={"error_kind": "setting"},
                      allow_retries=False)


def run_refusal(spec: WorkflowSpec, run_config: Mapping[str, Any], instance: dg.DagsterInstance,
                default_model: str) -> str | None:
    """Why a run of `spec` with `run_config` must not start (its budget would not hold), or None: for a launcher
    that can refuse before the run exists. Every prompt op checks the same before its first call."""
    configured = ((run_config.get("resources") or {}).get(BUDGET_RESOURCE_KEY) or {}).get("config") or {}
    budget = RunBudget(**configured).over(spec)
    if budget.unlimited:
        return None
    # Opening the store only matters, and is only paid for, when the steps run in separate processes.
    no_store = open_store(instance, warn=False)[1] if executor_kind(run_config) in SPREAD_EXECUTORS else None
    models = [spec.settings_for(task).model or default_model for task in spec.all_tasks()]
    return budget_refusal(budget, run_config, no_store, models)


def is_resume(run: dg.DagsterRun) -> bool:
    """Whether the run re-executes a failed one from failure (UI, run retries, `mp-pipelines resume`): only then do
    calls take the answers its run family already got. Re-executing all steps asks the model again."""
    return run.parent_run_id is not None and run.is_resume_retry


def run_items(context: dg.OpExecutionContext, task: TaskSpec, coro: Coroutine[Any, Any, T]) -> T:
    """Run a shard's items (`coro`) on the shared loop, cancelled when the run is terminated; what stops them all
    (an error in STOPS_THE_FAN_OUT, an unusable MP_* setting) fails the step, without retries."""
    try:
        return shared_loop().run(coro, should_stop=lambda: run_is_stopping(context))
    except LLMError as exc:
        raise dg.Failure(f"task {task.name}: {exc}", metadata=failure_metadata(exc), allow_retries=False) from None
    except SettingError as exc:
        raise setting_failure(task.name, exc) from None


def settle_writes(scope: CallScope) -> None:
    """Wait until the op's answers are stored, so a finished step implies a persisted cache/checkpoint."""
    if scope.store is not None and not scope.store.flush():
        dg.get_dagster_logger().warning(f"{scope.task}: LLM answers are still being written to {scope.store!r}")


def run_is_stopping(context: dg.OpExecutionContext) -> bool:
    """True once the run is being terminated, so in-flight calls can be cancelled."""
    run = context.instance.get_run_by_id(context.run_id)
    return run is None or run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def call_model(context: dg.OpExecutionContext, spec: WorkflowSpec, task: TaskSpec, template_context: Mapping[str, Any],
               *, label: str, deadline: float | None) -> TaskRun:
    """Run one prompt, turning errors into Dagster failures that retry only when retrying can help."""
    llm = chat_model(context)
    scope = call_scope(context, spec, task)
    try:
        run = run_task(llm, spec, task, template_context, label=label, deadline=deadline,
                       scope=scope, should_stop=lambda: run_is_stopping(context))
    except SettingError as exc:
        raise setting_failure(label, exc) from None
    except TemplateError as exc:
        raise dg.Failure(f"task {label}: template error: {exc}", allow_retries=False) from None
    except LLMError as exc:
        raise dg.Failure(str(exc), metadata=failure_metadata(exc), allow_retries=exc.retryable) from None
    except TaskTimeout as exc:
        raise dg.Failure(str(exc), metadata={"error_kind": "timeout"}) from None
    settle_writes(scope)
    fields = {"mp": log_fields(context, run.usage, run.model, task.name, http_attempts=run.attempts)}
    if run.usage.cache_hits:
        context.log.info(f"{label}: answered from the response cache (no call made)", extra=fields)
    else:
        context.log.info(
            f"{label}: {run.model} ({run.provider}) answered in {run.usage.latency_s:.2f} s, "
            f"{run.usage.prompt_tokens}+{run.usage.completion_tokens} tokens, ${run.usage.cost_usd:.6f}, "
            f"{run.attempts} attempt(s)", extra=fields
        )
    return run


def log_fields(context: dg.OpExecutionContext, usage: Usage, model: str | None, task: str,
               http_attempts: int | None = None) -> dict[str, Any]:
    """The structured fields of a step's summary line (JSON logs): task, model, usage, retry attempt."""
    return {"task": task, "model": model, "calls": usage.calls, "cache_hits": usage.cache_hits,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cost_usd": round(usage.cost_usd, 9), "latency_s": round(usage.latency_s, 4),
            "attempt": context.retry_number + 1, "http_attempts": http_attempts}


def failure_metadata(exc: LLMError) -> dict[str, Any]:
    """Metadata of a failed call: its kind, what it spent, and the unusable answer if there was one."""
    metadata: dict[str, Any] = {"error_kind": exc.kind, **getattr(exc, "usage", Usage()).as_metadata()}
    if exc.result is not None:
        metadata["raw_output"] = dg.MetadataValue.text(preview(exc.result.text, 2000))
    return metadata


def call_metadata(run: TaskRun) -> dict[str, Any]:
    """Output metadata of a call: usage under the `llm/` prefix plus model and provider."""
    return {**run.usage.as_metadata(), "model": run.model, "provider": run.provider,
            "models": dg.MetadataValue.json({run.model: run.usage.calls}),
            "finish_reason": run.finish_reason or "", "attempts": run.attempts}


def asset_metadata(metadata: Mapping[str, Any], value: Any) -> dict[str, Any]:
    """The metadata of a task asset's output (its materialization): `metadata` (usage under `llm/`, kept for the
    step's tally) plus the usage summed up, and a preview of the value (Markdown for a text answer)."""
    meta = dict(metadata)
    usage = Usage.from_metadata(metadata)
    meta.update({"calls": usage.calls, "cache_hits": usage.cache_hits, "prompt_tokens": usage.prompt_tokens,
                 "completion_tokens": usage.completion_tokens, "latency_s": round(usage.latency_s, 3),
                 "cost_usd": round(usage.cost_usd, 9), "retries": usage.retries, "rate_limited": usage.rate_limited,
                 "preview": dg.MetadataValue.text(preview(value))})
    if isinstance(value, str):
        meta["answer"] = dg.MetadataValue.md(preview(value, ANSWER_CHARS))
    if usage.batch_requests:  # batch mode: answers through the Batch API and what they saved at online prices
        meta.update({"batch_requests": usage.batch_requests, "batch_saving_usd": round(usage.batch_saving_usd, 9)})
    return meta


ANSWER_CHARS = 20_000  # a text answer shown as Markdown on the asset page; the full answer is the stored value


def task_deadline(task: TaskSpec) -> float | None:
    return None if task.timeout is None else time.monotonic() + task.timeout


def split_inputs(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    values = dict(inputs)
    return values.pop(INPUTS_OP), values


def upstream_ins(names: list[str]) -> dict[str, dg.In]:
    return {INPUTS_OP: dg.In(dg.Any), **{name: dg.In(dg.Any) for name in names}}


def build_task_op(spec: WorkflowSpec, task: TaskSpec, upstream: list[str], pool: str | None = None) -> dg.OpDefinition:
    """One op for a plain task; with `when`, its output is optional and downstream skips when false."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        template_context = build_context(spec, workflow_inputs, values)
        if not check_condition(context, task, template_context, task.name):
            return
        run = call_model(context, spec, task, template_context, label=task.name, deadline=task_deadline(task))
        yield dg.Output(run.output, metadata=asset_metadata(call_metadata(run), run.output))

    return make_op(spec, task.name, compute, step=task_step(spec.name, task.name), ins=upstream_ins(upstream),
                   outs={"result": dg.Out(dg.Any, is_required=task.when is None,
                                          code_version=task_code_version(spec, task))},
                   description=task.description or None, retry_policy=retry_policy(task), pool=pool,
                   required_resource_keys=PROMPT_RESOURCE_KEYS, tags={WORKFLOW_TAG: spec.name})


def check_condition(context: dg.OpExecutionContext, task: TaskSpec, template_context: Mapping[str, Any],
                    label: str) -> bool:
    """Whether the task's `when` holds (logged when it does not); a `when` that cannot be evaluated fails the step."""
    try:
        holds = condition_holds(task, template_context)
    except TemplateError as exc:
        raise dg.Failure(f"task {label}: `when` could not be evaluated: {exc}", allow_retries=False) from None
    if not holds:
        context.log.info(f"{label}: skipped because `when: {task.when}` is false")
    return holds
