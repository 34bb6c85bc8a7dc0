"""Run budgets: once a run has spent its calls, tokens or dollars, no new call starts.

A `BudgetTracker` per run and process lives on the shared event loop (see calls.py), so every shard
and step of the process sees one account. It starts from what the run's finished steps already
spent (read from the event log by the op, for executors with one process per step), admits a call
only while every limit is unreached, and settles each call's usage when it ends. Calls already in
flight when a limit is reached finish and count: the overshoot is bounded by the calls in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mp_pipelines.execution.client import LLMError
from mp_pipelines.execution.usage import Usage
from mp_pipelines.spec.models import BudgetSpec


def usd(amount: float) -> str:
    """Dollars to the micro-dollar, without trailing zeros: $0.00005, $0.000222, $2."""
    return "$" + (f"{amount:,.6f}".rstrip("0").rstrip(".") or "0")


class BudgetExceeded(LLMError):
    """A call was not started because the run's budget is spent (never retried)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="budget")


@dataclass
class BudgetTracker:
    """One run's spend in this process against its budget."""

    run_id: str
    budget: BudgetSpec
    spent: Usage = field(default_factory=Usage)
    started: int = 0  # calls admitted so far (in flight or finished), for max_calls

    def __post_init__(self) -> None:
        self.started = max(self.started, self.spent.calls)

    def reached(self) -> str | None:
        """Which limit is reached, as a sentence with the limit and the amount spent; None while within budget."""
        b, s = self.budget, self.spent
        if b.max_calls is not None and self.started >= b.max_calls:
            return f"max_calls of {b.max_calls} reached: {self.started} call(s) started"
        tokens = s.prompt_tokens + s.completion_tokens
        if b.max_tokens is not None and tokens >= b.max_tokens:
            return f"max_tokens of {b.max_tokens} reached: {tokens} token(s) spent in {s.calls} call(s)"
        if b.max_cost_usd is not None and s.cost_usd >= b.max_cost_usd:
            return f"max_cost_usd of {usd(b.max_cost_usd)} reached: {usd(s.cost_usd)} spent in {s.calls} call(s)"
        return None

    def admit(self, label: str) -> None:
        """Count a call about to start, or raise BudgetExceeded when a limit is reached."""
        reason = self.reached()
        if reason is not None:
            raise BudgetExceeded(f"budget of run {self.run_id}: {reason}; call {label or '(unlabelled)'} was not "
                                 "started (raise the budget in the workflow's `budget:` or the run config's "
                                 "resources.budget)")
        self.started += 1

    def settle(self, usage: Usage) -> None:
        """Add a finished call's usage (tokens and cost of a failed call that got an answer count too)."""
        self.spent = self.spent + usage
