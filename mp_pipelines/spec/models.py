"""Pydantic models of a workflow: the data a YAML file or a WorkflowBuilder produces.

Per-field checks live here; checks across fields and tasks (dependencies, cycles, template
references) live in `spec/validate.py`, so a file's every problem can be reported at once.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from mp_pipelines.spec.checks import CheckSpec
from mp_pipelines.spec.inputs import coerce_input
from mp_pipelines.spec.templates import JINJA_GLOBALS, JINJA_SPECIAL_NAMES

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names become op, asset, job and file names (step keys, compute logs, stored outputs) with suffixes added.
MAX_NAME_CHARS = 64
# Generated op names join a task name and a suffix with "__", so user names may not contain it.
RESERVED_SEPARATOR = "__"
# Names a template can use besides inputs and tasks.
RESERVED_NAMES = frozenset({"inputs", "item", "item_index", "loop", "workflow", "previous"})
# Names Dagster refuses for an op, asset or job besides Python keywords (`DISALLOWED_NAMES` of Dagster
# 1.13.27, compared in test_architecture.py); tasks, loops and workflows become ops, assets and jobs.
DAGSTER_RESERVED_NAMES = frozenset({
    "arg_dict", "bool", "conf", "config", "context", "dict", "float", "input", "input_arg_dict", "int", "meta",
    "output", "output_arg_dict", "str", "type",
})

InputType = Literal["string", "integer", "number", "boolean", "list", "table"]
OutputKind = Literal["text", "json"]
# read_write: answer from the cache when it can and store new answers; read / write: only one of the two.
CachePolicy = Literal["read_write", "read", "write", "off"]
ItemFailurePolicy = Literal["fail", "skip"]
CallMode = Literal["batch", "online"]


def is_valid_cron(value: str) -> bool:
    """True if Dagster accepts `value` as a schedule's cron string (what `is_valid_cron_string` of Dagster
    1.13.27 accepts, checked with the croniter package instead of Dagster's vendored copy of it).

    Five fields (no seconds, no year) or a nickname (`@daily`, `@hourly`, ...); names (`mon-fri`, `jan`),
    lists, ranges, steps, `L` and `#` as croniter reads them; not the 30th or 31st of February alone; not
    `W` (nearest weekday) in the day of month, which newer croniter releases read and Dagster's does not.
    """
    try:
        if not croniter.is_valid(value):
            return False
        fields, *_ = croniter.expand(value)
    except Exception:  # noqa: BLE001 - croniter raises several types on odd input; all mean "not valid"
        return False
    if len(fields) != 5:
        return False
    days, months = fields[2], fields[3]
    if len(months) == 1 and months[0] == 2 and len(days) == 1 and days[0] in (30, 31):
        return False
    words = value.split()
    return len(words) != 5 or "w" not in words[2].lower()


def check_name(value: str, what: str) -> str:
    """Return `value` if it is a usable task/input/workflow name, else raise ValueError saying why.

    Every layer that uses the name must accept it: Jinja (templates read tasks by name), Dagster (ops,
    assets, jobs) and the file system (step keys in file names).
    """
    if len(value) > MAX_NAME_CHARS:
        shown = value[:20] + "…"
        raise ValueError(f"{what} name {shown!r} is {len(value):,} characters long; "
                         f"names may have at most {MAX_NAME_CHARS}")
    if not IDENTIFIER.match(value):
        raise ValueError(f"{what} name {value!r} is not an identifier (letters, digits, '_'; not starting with a digit)")
    if RESERVED_SEPARATOR in value:
        raise ValueError(f"{what} name {value!r} contains '__', which is reserved for generated op names")
    if value in RESERVED_NAMES:
        raise ValueError(f"{what} name {value!r} is reserved for templates ({', '.join(sorted(RESERVED_NAMES))})")
    # Input names are run config fields read as inputs.<name>, not Dagster names or template names:
    # only the other names are refused here.
    if what == "input":
        return value
    if keyword.iskeyword(value) or value in DAGSTER_RESERVED_NAMES:
        reason = "a Python keyword" if keyword.iskeyword(value) else "reserved by Dagster"
        raise ValueError(f"{what} name {value!r} is {reason}; Dagster cannot name an op, asset or job with it")
    if value in JINJA_GLOBALS:
        raise ValueError(f"{what} name {value!r} is a Jinja global ({', '.join(sorted(JINJA_GLOBALS))}), so a "
                         f"template reading {value!r} would get Jinja's; choose another name")
    if value in JINJA_SPECIAL_NAMES:
        raise ValueError(f"{what} name {value!r} means something else in a template (Jinja reads "
                         f"{', '.join(sorted(JINJA_SPECIAL_NAMES))} itself); choose another name")
    return value


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `depend_on` must not pass silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(_Strict):
    """One workflow input, shown in the Dagster Launchpad as run config."""

    type: InputType = "string"
    description: str = ""
    default: Any = None

    @property
    def required(self) -> bool:
        return self.default is None

    @model_validator(mode="after")
    def _default_matches_type(self) -> InputSpec:
        if self.default is not None:
            try:
                coerce_input(self.type, self.default, "default", check_size=False)
            except ValueError as exc:
                raise ValueError(str(exc).replace("input 'default' expects", "default must be", 1)) from None
        return self


class ModelSettings(_Strict):
    """Model parameters; workflow `defaults` and each task may set them, the task winning."""

    model: str | None = Field(default=None, description="Model name sent to the endpoint, e.g. gpt-4o-mini.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    system: str | None = Field(default=None, description="System message (a template).")


_SETTING_NAMES = tuple(ModelSettings.model_fields)


class RetrySpec(_Strict):
    """A task's retries: the retry budget of each of its model calls (calls/retry.py, instead of the default) and
    its steps' Dagster RetryPolicy."""

    max_retries: int = Field(default=3, ge=0, le=100)
    delay: float = Field(default=1.0, ge=0.0, le=3600.0, description="Seconds before the first retry.")
    backoff: Literal["linear", "exponential"] | None = None
    jitter: Literal["full", "plus_minus"] | None = None


class LimitsSpec(_Strict):
    """Caps on all of a run's calls to one model; unset fields fall back to the LLM resource's."""

    max_in_flight: int | None = Field(default=None, ge=1, le=100_000)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)


PROVIDER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Headers that carry credentials: a key belongs in the environment variable named by `api_key_env`.
SECRET_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization", "cookie"})


class ProviderSpec(_Strict):
    """A named OpenAI-compatible endpoint; a task picks it with `model: <provider>/<model>`."""

    base_url: str = Field(description="Base URL of the endpoint, e.g. http://localhost:8000/v1.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the endpoint's API key (never the key itself); "
        "none for endpoints that take no key.")
    headers: dict[str, str] = Field(default_factory=dict, description="Headers sent with every request.")
    limits: LimitsSpec | None = Field(default=None, description="Caps on the calls to each of its models.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {value!r} is not an http(s) URL such as http://localhost:8000/v1")
        if parts.password is not None or parts.username is not None:
            raise ValueError("base_url must not hold credentials; name the environment variable of the key in "
                             "api_key_env")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise ValueError(f"api_key_env {value[:40]!r} is not an environment variable name (letters, digits, "
                             "'_'): it names the variable that holds the key, never the key itself")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in SECRET_HEADERS:
                raise ValueError(f"header {name!r} carries a credential; put the key in an environment variable "
                                 "and name it in api_key_env")
        return value


class BudgetSpec(_Strict):
    """Most a run may spend; when one is reached no new call starts and the run fails saying which."""

    max_cost_usd: float | None = Field(default=None, gt=0, description="US dollars, from the price table.")
    max_tokens: int | None = Field(default=None, ge=1, description="Prompt + completion tokens.")
    max_calls: int | None = Field(default=None, ge=1, description="Calls sent to the model (cache hits are free).")
    # Where each limit was set: "spec" (the workflow's budget:), "run_config" or "flag" (mp-pipelines run --max-…).
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def unlimited(self) -> bool:
        return self.max_cost_usd is None and self.max_tokens is None and self.max_calls is None

    def with_origins(self, origins: dict[str, str]) -> BudgetSpec:
        """This budget, knowing where each limit was set (for the message when one is reached)."""
        self._origins = dict(origins)
        return self

    def raise_hint(self, limit: str) -> str:
        """Where `limit` (max_calls, max_tokens, max_cost_usd) was set and how to raise it."""
        if limit not in type(self).model_fields:
            return "raise the budget in the workflow's budget: or the run config's resources.budget"
        origin = self._origins.get(limit, "spec")
        flag = "--" + limit.replace("_", "-")
        if origin == "flag":
            return f"{limit} was set by {flag}; pass a larger {flag}"
        if origin == "run_config":
            return (f"{limit} was set in the run config's resources.budget.config.{limit}; raise it there "
                    f"(or with {flag} on mp-pipelines run/resume)")
        return (f"{limit} was set in the workflow's budget:; raise it there, or for one run with {flag} "
                f"or the run config's resources.budget.config.{limit}")


class FailurePolicy(_Strict):
    """What a fan-out does with items that still fail after their retries (workflow default, task override)."""

    on_item_failure: ItemFailurePolicy | None = Field(
        default=None, description="fail: the task fails (default); skip: failed items are listed and left out.")
    min_success_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="With skip: the task still fails below this share of successes (unset: when none succeeded; "
        "0 explicitly: never).")
    cache: CachePolicy | None = Field(
        default=None, description="Response cache: read_write (default at temperature 0, else off), read, write, off.")
    fallback: list[str] | None = Field(
        default=None, description="Models (`model` or `provider/model`) that answer, in order, when the task's model "
        "still fails after its retries or its circuit is open.")

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false: take it as the policy the author wrote.
        return "off" if value is False else value


class BatchPolicy(_Strict):
    """How calls are sent: online (at once) or through the endpoint's Batch API (workflow default, task override)."""

    mode: CallMode | None = Field(
        default=None, description="online (default): calls go out at once; batch: through the Batch API at half the "
        "price, answers within 24 hours (docs/batch.md).")
    batch_repair: Literal["batch", "online"] | None = Field(
        default=None, description="In batch mode, where repair requests for unusable JSON go: a follow-up batch "
        "(default) or online calls.")
    batch_fallback: Literal["online"] | None = Field(
        default=None, description="online: on an endpoint without the Batch API, make the calls online instead of "
        "failing.")
    batch_on_expiry: Literal["resubmit", "fail"] | None = Field(
        default=None, description="What happens to the requests of a batch that expired unfinished: resubmitted "
        "once (default) or failed.")


@dataclass(frozen=True)
class BatchSettings:
    """A task's resolved batch policy (see BatchPolicy)."""

    mode: CallMode = "online"
    repair: Literal["batch", "online"] = "batch"
    fallback: Literal["online"] | None = None
    on_expiry: Literal["resubmit", "fail"] = "resubmit"


class TaskSpec(ModelSettings, FailurePolicy, BatchPolicy):
    """One prompt task: one op of the generated job and one asset `[workflow, task]`."""

    name: str
    description: str = ""
    prompt: str = Field(min_length=1)
    depends_on: list[str] = Field(default_factory=list)
    for_each: str | None = Field(default=None, description="Fan out over a task's list output or inputs.<name>.")
    when: str | None = Field(default=None, description="Jinja expression; the task is skipped when it is false.")
    output: OutputKind = "text"
    output_schema: dict[str, Any] | None = None
    retries: RetrySpec | None = None
    timeout: float | None = Field(default=None, gt=0.0, le=86_400.0, description="Seconds for the whole task.")
    shard_size: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Items per Dagster step of a fan-out (default: one step per item up to 32 items, "
        "else enough items per step to keep 32 steps).",
    )
    repair_attempts: int = Field(
        default=2, ge=0, le=10,
        description="For output: json, times an invalid answer is sent back with the validation error to fix.",
    )
    checks: list[CheckSpec] = Field(default_factory=list, description="Quality checks of its answers (asset checks).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "task")

    @model_validator(mode="after")
    def _schema_needs_json(self) -> TaskSpec:
        for key in ("shard_size", "on_item_failure", "min_success_ratio"):
            if getattr(self, key) is not None and self.for_each is None:
                raise ValueError(f"{key} is set but the task has no for_each; it only applies to fan-outs")
        if self.output_schema is not None and self.output != "json":
            raise ValueError("output_schema is set but output is 'text'; set output: json")
        if self.output_schema is not None:
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(self.output_schema)
            except SchemaError as exc:
                raise ValueError(f"output_schema is not a valid JSON schema: {exc.message}") from None
        return self


class LoopControl(_Strict):
    """How long a loop runs: at most `max_iterations` (≤ the workflow's depth), less when `until` holds."""

    max_iterations: int | None = Field(default=None, ge=1, le=100)
    until: str | None = Field(default=None, description="Jinja expression over this iteration's outputs.")


class LoopSpec(_Strict):
    """A bounded loop (depth): its tasks run in order, once per iteration, unrolled into the graph."""

    name: str
    description: str = ""
    depends_on: list[str] = Field(default_factory=list)
    loop: LoopControl = Field(default_factory=LoopControl)
    tasks: list[TaskSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "loop")


def _step_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "loop" if "tasks" in value else "task"
    return "loop" if isinstance(value, LoopSpec) else "task"


Step = Annotated[Union[Annotated[TaskSpec, Tag("task")], Annotated[LoopSpec, Tag("loop")]], Discriminator(_step_kind)]


class ScheduleSpec(_Strict):
    """A cron schedule for the workflow's job; off unless `enabled`."""

    cron: str
    timezone: str = "UTC"
    enabled: bool = False
    inputs: dict[str, Any] = Field(default_factory=dict)
    mode: CallMode | None = Field(default=None, description="batch or online for the scheduled runs (--mode).")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not is_valid_cron(value):
            raise ValueError(f"{value!r} is not a valid cron string (five fields, e.g. '0 6 * * *')")
        return value


class WorkflowSpec(FailurePolicy, BatchPolicy):
    """A whole workflow: inputs, defaults, limits and the DAG of tasks."""

    name: str
    description: str = ""
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    defaults: ModelSettings = Field(default_factory=ModelSettings)
    breadth: int = Field(default=8, ge=1, le=10_000, description="Most items of one fan-out in flight at once.")
    depth: int = Field(default=3, ge=1, le=100, description="Most iterations a loop may run.")
    max_items: int = Field(default=1000, ge=1, le=10_000_000, description="Largest fan-out allowed.")
    limits: LimitsSpec | None = None
    providers: dict[str, ProviderSpec] = Field(
        default_factory=dict, description="Named OpenAI-compatible endpoints (also from MP_PROVIDERS_FILE).")
    budget: BudgetSpec | None = None
    schedule: ScheduleSpec | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    tasks: list[Step] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "workflow")

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, value: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in value:
            check_name(name, "input")
        return value

    @field_validator("schedule", mode="before")
    @classmethod
    def _cron_shorthand(cls, value: Any) -> Any:
        return {"cron": value} if isinstance(value, str) else value

    def all_tasks(self) -> list[TaskSpec]:
        """Every task, loop bodies included, in file order."""
        out: list[TaskSpec] = []
        for step in self.tasks:
            out.extend(step.tasks if isinstance(step, LoopSpec) else [step])
        return out

    def step(self, name: str) -> TaskSpec | LoopSpec:
        """The top-level task or loop called `name` (KeyError if none)."""
        for step in self.tasks:
            if step.name == name:
                return step
        raise KeyError(name)

    def settings_for(self, task: TaskSpec) -> ModelSettings:
        """The task's model settings with the workflow defaults filled in."""
        defaults = self.defaults
        merged = {}
        for name in _SETTING_NAMES:
            value = getattr(task, name)
            merged[name] = value if value is not None else getattr(defaults, name)
        return ModelSettings.model_construct(**merged)  # both sides are validated already (this runs per call)

    def cache_policy(self, task: TaskSpec) -> CachePolicy:
        """The task's cache policy: its own, else the workflow's, else read_write at temperature 0 and off above."""
        chosen = task.cache or self.cache
        if chosen is not None:
            return chosen
        return "read_write" if self.settings_for(task).temperature == 0 else "off"

    def fallback_for(self, task: TaskSpec) -> tuple[str, ...]:
        """The task's fallback models: its own `fallback`, else the workflow's."""
        chosen = task.fallback if task.fallback is not None else self.fallback
        return tuple(chosen or ())

    def failure_policy(self, task: TaskSpec) -> tuple[ItemFailurePolicy, float | None]:
        """(on_item_failure, min_success_ratio) of a fan-out task, the workflow's filling the task's gaps.

        The ratio is None when neither sets it, so that the default (at least one success) stays apart from an
        explicit `min_success_ratio: 0` (no success needed)."""
        policy = task.on_item_failure or self.on_item_failure or "fail"
        ratio = task.min_success_ratio if task.min_success_ratio is not None else self.min_success_ratio
        return policy, ratio

    def batch_settings(self, task: TaskSpec, run_mode: CallMode | None = None) -> BatchSettings:
        """The task's batch policy, the workflow's filling its gaps; `run_mode` (the run's `--mode`) wins."""
        def pick(name: str, default: Any) -> Any:
            own = getattr(task, name)
            return own if own is not None else getattr(self, name) if getattr(self, name) is not None else default
        return BatchSettings(run_mode or pick("mode", "online"), pick("batch_repair", "batch"),
                             pick("batch_fallback", None), pick("batch_on_expiry", "resubmit"))

    @model_validator(mode="after")
    def _batch_cost_needs_max_tokens(self) -> WorkflowSpec:
        # A batch's cost is admitted before it is sent, so every answer needs a bound (max_tokens).
        if self.budget is None or self.budget.max_cost_usd is None:
            return self
        for task in self.all_tasks():
            if self.batch_settings(task).mode == "batch" and self.settings_for(task).max_tokens is None:
                raise ValueError(f"task {task.name!r} runs in batch mode under a cost budget (budget.max_cost_usd), "
                                 "so it needs max_tokens (on the task or in defaults): a batch's cost is admitted "
                                 "before it is sent, with max_tokens as the bound of each answer")
        return self

    def to_yaml(self) -> str:
        """The spec as YAML that loads back to an equal spec."""
        import yaml

        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"name": data.pop("name"), **data}  # name first for readers
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
