"""An executor that wraps another: what Dagster asks of an executor besides `execute` is the inner one's."""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from mp_pipelines.dagster_ext.compat import checked_overrides


@checked_overrides
class DelegatingExecutor(dg.Executor):
    """`inner`'s retries, step dependencies and run; subclasses wrap `execute`."""

    def __init__(self, inner: dg.Executor) -> None:
        self._inner = inner

    @property
    def retries(self) -> Any:
        return self._inner.retries

    @property
    def step_dependency_config(self) -> Any:
        return self._inner.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        return self._inner.execute(plan_context, execution_plan)
