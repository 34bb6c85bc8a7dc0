"""Stage: run budgets. Once a run has spent its calls, tokens or dollars, no new call starts.

The run's account lives in the response store's database (`mp_run_spend`), so every process of the
run (the multiprocess executor's step processes included) draws on one account: a call is admitted
by one atomic conditional UPDATE (calls < max_calls and tokens < max_tokens and cost < max_cost),
and its tokens and cost are added when it ends. Calls already in flight when a limit is reached
finish and count: `max_calls` is exact, and the tokens/cost overshoot is bounded by the calls in
flight. Without a store the account is kept in this process only, which holds the whole run only when
every step runs in one process: otherwise (`unshared_account`) the run refuses to call at all.

A re-executed run (resume) has its own account: it may spend its budget again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mp_pipelines.calls.call import Answer, Call, Proceed
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMError
from mp_pipelines.spec.models import BudgetSpec

if TYPE_CHECKING:
    from mp_pipelines.calls.store import ResponseStore


def usd(amount: float) -> str:
    """Dollars to the micro-dollar, without trailing zeros: $0.00005, $0.000222, $2."""
    return "$" + (f"{amount:,.6f}".rstrip("0").rstrip(".") or "0")


class BudgetExceeded(LLMError):
    """A call was not started because the run's budget is spent (never retried)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="budget")

    def __reduce__(self) -> tuple[Any, ...]:
        return BudgetExceeded, (str(self),)


def reached(budget: BudgetSpec, calls: int, tokens: int, cost_usd: float) -> str | None:
    """Which limit is reached, as a sentence with the limit and the amount spent; None while within budget."""
    if budget.max_calls is not None and calls >= budget.max_calls:
        return f"max_calls of {budget.max_calls} reached: {calls} call(s) started"
    if budget.max_tokens is not None and tokens >= budget.max_tokens:
        return f"max_tokens of {budget.max_tokens} reached: {tokens} token(s) spent"
    if budget.max_cost_usd is not None and cost_usd >= budget.max_cost_usd:
        return f"max_cost_usd of {usd(budget.max_cost_usd)} reached: {usd(cost_usd)} spent"
    return None


def limits_text(budget: BudgetSpec) -> str:
    """The budget's limits for messages: `max_calls 10, max_cost_usd $0.5`."""
    parts = [f"max_calls {budget.max_calls}" if budget.max_calls is not None else "",
             f"max_tokens {budget.max_tokens}" if budget.max_tokens is not None else "",
             f"max_cost_usd {usd(budget.max_cost_usd)}" if budget.max_cost_usd is not None else ""]
    return ", ".join(part for part in parts if part)


def unshared_account(budget: BudgetSpec, no_store: str, executor: str = "multiprocess") -> str:
    """Why `budget` cannot hold for a run whose steps run in separate processes when there is no store to keep
    one account for all of them (`no_store` says why there is none)."""
    return (f"the run's budget ({limits_text(budget)}) cannot hold across the step processes of the {executor} "
            f"executor: {no_store}, so each process would keep an account of its own; set MP_CACHE_URL to a "
            "reachable database, or run on the concurrent executor (--executor concurrent)")


@dataclass
class BudgetTracker:
    """One run's account against its budget: in the store when there is one, else in this process."""

    run_id: str
    budget: BudgetSpec
    store: ResponseStore | None = None
    spent: Usage = field(default_factory=Usage)  # this process's view (the whole account without a store)
    started: int = 0  # calls admitted in this process

    async def admit(self, label: str) -> None:
        """Count a call about to start, or raise BudgetExceeded when a limit is reached."""
        b = self.budget
        if self.store is not None:
            admitted, calls, tokens, cost = await self.store.arun(
                self.store.reserve_call, self.run_id, b.max_calls, b.max_tokens, b.max_cost_usd)
            reason = None if admitted else (reached(b, calls, tokens, cost) or "a limit was reached")
        else:
            reason = reached(b, self.started, self.spent.prompt_tokens + self.spent.completion_tokens,
                             self.spent.cost_usd)
        if reason is not None:
            hint = b.raise_hint(reason.partition(" of ")[0])
            raise BudgetExceeded(f"budget of run {self.run_id}: {reason}; call {label or '(unlabelled)'} was not "
                                 f"started ({hint})")
        self.started += 1

    async def settle(self, usage: Usage) -> None:
        """Add a finished call's usage (a failed call that got an answer costs its tokens too)."""
        self.spent = self.spent + usage
        if self.store is not None:
            await self.store.arun(self.store.add_spend, self.run_id, usage.prompt_tokens + usage.completion_tokens,
                                  usage.cost_usd)


class BudgetAdmission:
    """A call starts only when the run's budget admits it; what it spent (a failed answer too) is charged."""

    async def __call__(self, call: Call, proceed: Proceed) -> Answer:
        scope = call.scope
        if scope.budget is None or scope.budget.unlimited:
            return await proceed(call)
        account = scope.run.budget(scope.budget, scope.store)
        await account.admit(call.request.label)  # after the wait for a limiter slot: queued calls stop too
        try:
            answer = await proceed(call)
        except LLMError as exc:  # an answer that was unusable still cost its tokens
            await account.settle(Usage.of_result(exc.result) if exc.result is not None else Usage())
            raise
        await account.settle(answer.usage)
        return answer
