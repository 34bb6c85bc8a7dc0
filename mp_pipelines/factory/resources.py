"""Resources of the generated jobs besides the LLM itself (that one is `llm.resource.LLMResource`)."""

from __future__ import annotations

import threading

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


class StepStorage(dg.FilesystemIOManager):
    """Where steps store their outputs and task assets their values (Dagster's filesystem IO manager: `base_dir`,
    else the instance's storage folder); reading an asset that has no stored value fails with what to do."""

    def create_io_manager(self, context: dg.InitResourceContext) -> dg.IOManager:
        return _ExplainedLoads(super().create_io_manager(context))


class _ExplainedLoads(dg.IOManager):
    """An IO manager whose missing upstream values are one sentence naming the asset, not a FileNotFoundError."""

    def __init__(self, inner: dg.IOManager) -> None:
        self._inner = inner

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        self._inner.handle_output(context, obj)

    def load_input(self, context: dg.InputContext) -> object:
        try:
            return self._inner.load_input(context)
        except FileNotFoundError as exc:
            if not context.has_asset_key:
                raise
            raise dg.Failure(missing_upstream(context.asset_key, exc.filename), allow_retries=False) from None


def missing_upstream(key: dg.AssetKey, path: str | None) -> str:
    """Why a subset cannot run: asset `key` it reads was never materialized (with this step storage)."""
    workflow = key.path[0]
    where = f" (nothing stored at {path})" if path else ""
    return (f"asset {key.to_user_string()} has never been materialized{where}, and the assets selected read it: "
            f"materialize it too (select it with what is downstream of it, e.g. 'Materialize' on it in the Catalog), "
            f"or run the whole workflow first (`mp-pipelines run {workflow}`)")
