"""Sending parked calls as Batch API jobs: re-attach, admit, upload, create, checkpoint, poll, read, answer.

One `send` per flush of a `BatchCollector`:

1. calls whose request a batch of the run family already carries (a resumed run) follow that batch;
2. the others are admitted against the run's budget at their estimated cost (prompt tokens counted, `max_tokens`
   as the bound of each answer, batch prices), written as JSONL files of at most MP_BATCH_MAX_LINES lines and
   200 MB, uploaded, and created as batches, each checkpointed as soon as it exists;
3. every batch is polled (1 s, doubling up to MP_BATCH_POLL_SECONDS) until it ends; its output and error files
   are read and each line answers the call of its `custom_id`. Requests an expired batch did not run are
   resubmitted once (`batch_on_expiry: resubmit`) or fail. Waiting is an asyncio sleep: no thread, no CPU.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mp_pipelines.calls.batch_records import adjust_spend, batches_of, mark_batch, reserve_batch, save_batch
from mp_pipelines.calls.budget import BudgetExceeded, limits_text, usd
from mp_pipelines.calls.call import Answer
from mp_pipelines.calls.pricing import current_prices
from mp_pipelines.calls.settings import N, number_setting
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import LLMError, LLMResult

if TYPE_CHECKING:
    from mp_pipelines.calls.batch import BatchCollector, Parked

MAX_LINES_ENV = "MP_BATCH_MAX_LINES"
POLL_ENV = "MP_BATCH_POLL_SECONDS"
DEFAULT_MAX_LINES = 50_000  # the Batch API's limit per file
MAX_FILE_BYTES = 200 * 1024 * 1024  # the Batch API's limit per file
DEFAULT_POLL_SECONDS = 30.0
FIRST_POLL_SECONDS = 1.0
CHARS_PER_TOKEN = 3  # a conservative count of prompt tokens for the estimate (English runs about 4)
MAX_POLL_ERRORS = 10  # polls in a row that may fail (connection lost, 5xx) before the batch's calls fail
CANCEL_SECONDS = 10.0  # most one cancellation may take while the run stops
DONE = frozenset({"completed", "failed", "expired", "cancelled"})
UNRUN = frozenset({"batch_expired", "batch_cancelled"})  # error codes of lines the batch never ran


def _number(variable: str, default: N, read: Callable[[str], N]) -> N:
    return number_setting(variable, default, read=read, valid=lambda value: value > 0,
                          rule="a number greater than 0")


def _setting(variable: str, default: N, read: Callable[[str], N]) -> N:
    try:
        return _number(variable, default, read)
    except ValueError as exc:
        raise LLMError(str(exc), kind="bad_request") from None


def check_settings() -> None:
    """SettingError when MP_BATCH_MAX_LINES or MP_BATCH_POLL_SECONDS cannot be used."""
    _number(MAX_LINES_ENV, DEFAULT_MAX_LINES, int)
    _number(POLL_ENV, DEFAULT_POLL_SECONDS, float)


def max_lines() -> int:
    return _setting(MAX_LINES_ENV, DEFAULT_MAX_LINES, int)


def poll_seconds() -> float:
    return _setting(POLL_ENV, DEFAULT_POLL_SECONDS, float)


async def send(collector: BatchCollector, parked: list[Parked]) -> None:
    """Get every parked call its answer (or error) through batches; cancelled, cancel the batches in flight."""
    sender = _Sender(collector)
    try:
        await sender.run(parked)
    except asyncio.CancelledError:
        await asyncio.shield(sender.cancel_all())
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever stopped the batches stops their calls, as that error
        error = exc if isinstance(exc, LLMError) else LLMError(f"batch mode failed: {type(exc).__name__}: {exc}",
                                                               kind="server_error")
        sender.fail(parked, error)
    finally:
        sender.fail(parked, LLMError("the batch ended without an answer for this request", kind="server_error"))


# Senders with batches running in this process, so that a process that is stopped (a terminated run worker leaves
# its step threads behind and exits) cancels their batches on its way out; a killed one leaves them to a resume.
_LIVE: weakref.WeakSet[_Sender] = weakref.WeakSet()


def _cancel_at_exit() -> None:
    # Synchronous: by now the interpreter takes no new work on thread pools, which the event loop's connects need.
    for sender in list(_LIVE):
        for batch_id, scope in list(sender.live.items()):
            sender.cancel_now(batch_id, scope)


atexit.register(_cancel_at_exit)


class _Sender:
    def __init__(self, collector: BatchCollector) -> None:
        self.collector = collector
        self.live: dict[str, Any] = {}  # batch id -> its store scope, while it runs
        self.api: Any = None
        _LIVE.add(self)

    def finish(self, parked: Parked, *, answer: Answer | None = None, error: BaseException | None = None) -> None:
        if parked.future.done():
            return
        self.collector.answered(parked)
        if error is not None:
            parked.future.set_exception(error)
        else:
            parked.future.set_result(answer)

    def fail(self, parked: list[Parked], error: BaseException) -> None:
        for one in parked:
            self.finish(one, error=error)

    async def run(self, parked: list[Parked]) -> None:
        scope = parked[0].call.scope
        api_of = getattr(parked[0].call.model, "batch_api", None)
        if api_of is None:
            raise LLMError(f"task {scope.task}: its model has no Batch API; run it with --mode online",
                           kind="batch_unsupported")
        api = self.api = api_of()
        waiting = []
        fresh = parked
        if scope.store is not None:  # a resumed run follows the batches its family already paid for
            records = await scope.store.arun(batches_of, scope.store, scope.root_run_id, scope.task)
            fresh = []
            taken: set[str] = set()
            for one in parked:
                record = next((r for r in records if r.lines.get(one.custom_id) == one.checkpoint
                               and (r.batch_id, one.custom_id) not in taken), None)
                if record is None:
                    fresh.append(one)
                    continue
                taken.add((record.batch_id, one.custom_id))
                waiting.append((record.batch_id, [one], None))
            joined: dict[str, list[Parked]] = {}
            for batch_id, group, _ in waiting:
                joined.setdefault(batch_id, []).extend(group)
            waiting = [(batch_id, group, None) for batch_id, group in joined.items()]
            for batch_id, group, _ in waiting:
                self.collector.log.info(f"{scope.task}: following batch {batch_id} ({len(group)} request(s)) that "
                                        "an earlier attempt of this run submitted")
        if fresh:
            try:
                waiting.extend(await self.submit(api, fresh, resubmission=False))
            except LLMError as exc:
                if exc.kind == "batch_unsupported" and self.collector.settings.fallback == "online":
                    self.collector.online = True
                    self.collector.log.warning(f"{scope.task}: {exc}; making its calls online (batch_fallback: online)")
                    await asyncio.gather(*(self.online(one) for one in fresh))
                else:
                    self.fail(fresh, exc)
        await asyncio.gather(*(self.follow(api, batch_id, group, estimate) for batch_id, group, estimate in waiting))

    async def online(self, parked: Parked) -> None:
        try:
            answer = await parked.proceed(parked.call)
        except BaseException as exc:  # noqa: BLE001 - the call's own outcome
            self.finish(parked, error=exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self.finish(parked, answer=answer)

    # -- submitting --
    async def submit(self, api: Any, parked: list[Parked], *, resubmission: bool) -> list[tuple[str, list[Parked],
                                                                                                  tuple[int, float]]]:
        """Admit, write, upload and create the batches for `parked`; [(batch id, its calls, its estimate)]."""
        scope = parked[0].call.scope
        files: list[tuple[list[Parked], list[bytes]]] = []
        limit = max_lines()
        for one in parked:
            line = api.line(one.custom_id, one.call.request)
            if not files or len(files[-1][0]) >= limit or sum(map(len, files[-1][1])) + len(line) > MAX_FILE_BYTES:
                files.append(([], []))
            files[-1][0].append(one)
            files[-1][1].append(line)
        submitted = []
        for number, (group, lines) in enumerate(files, 1):
            try:
                estimate = await self.admit(group)
                file_id = await api.upload(b"".join(lines), f"{scope.workflow}-{scope.task}-{number}.jsonl")
                metadata = {"workflow": scope.workflow, "run_id": scope.run_id, "task": scope.task}
                batch = await api.create(file_id, metadata)
            except LLMError as exc:
                if exc.kind == "batch_unsupported":
                    raise
                self.fail(group, exc)  # this file's calls fail (e.g. past the budget); the other files go on
                continue
            self.live[batch.id] = scope
            if scope.store is not None:
                await scope.store.arun(save_batch, scope.store, scope.root_run_id, scope.task, batch.id, scope.run_id,
                                       {one.custom_id: one.checkpoint for one in group})
            again = " (resubmitting what an expired batch did not run)" if resubmission else ""
            self.collector.log.info(f"{scope.task}: submitted batch {batch.id} of {len(group)} request(s){again}, "
                                    f"file {number} of {len(files)}")
            submitted.append((batch.id, group, estimate))
        return submitted

    async def admit(self, group: list[Parked]) -> tuple[int, float] | None:
        """Charge the batch's estimated tokens and cost to the run's budget; BudgetExceeded (none sent) if it would
        pass a limit. The estimate, to be replaced by the spend once answered; None without a budget."""
        scope = group[0].call.scope
        budget = scope.budget
        if budget is None or budget.unlimited:
            return None
        table = current_prices()
        tokens, cost, bound = 0, 0.0, True
        for one in group:
            request = one.call.request
            prompt = sum(math.ceil(len(str(m.get("content", ""))) / CHARS_PER_TOKEN) + 4 for m in request.messages)
            answer = request.max_tokens or 0
            bound = bound and request.max_tokens is not None
            tokens += prompt + answer
            cost += table.batch_cost(request.model, prompt, answer)
        if budget.max_cost_usd is not None and not bound:
            raise BudgetExceeded(f"task {scope.task} runs in batch mode under the cost budget max_cost_usd "
                                 f"{usd(budget.max_cost_usd)} but has no max_tokens: a batch's cost must be bounded "
                                 "before it is sent; set max_tokens on the task")
        account = scope.run.budget(budget, scope.store)
        if scope.store is not None:
            admitted, calls_now, tokens_now, cost_now = await scope.store.arun(
                reserve_batch, scope.store, scope.run_id, len(group), tokens, cost, budget.max_calls,
                budget.max_tokens, budget.max_cost_usd)
            if admitted:
                calls_now, tokens_now, cost_now = calls_now - len(group), tokens_now - tokens, cost_now - cost
        else:
            calls_now, spent = account.started, account.spent
            tokens_now, cost_now = spent.prompt_tokens + spent.completion_tokens, spent.cost_usd
            admitted = all(limit is None or now + amount <= limit for now, amount, limit in (
                (calls_now, len(group), budget.max_calls), (tokens_now, tokens, budget.max_tokens),
                (cost_now, cost, budget.max_cost_usd)))
            if admitted:
                account.started += len(group)
                account.spent = account.spent + Usage(prompt_tokens=tokens, cost_usd=cost)
        if not admitted:
            raise BudgetExceeded(
                f"budget of run {scope.run_id} ({limits_text(budget)}): a batch of {len(group)} request(s) of task "
                f"{scope.task} would need up to {tokens} token(s) and {usd(cost)} (prompt tokens counted, max_tokens "
                f"per answer, batch prices) on top of {calls_now} call(s), {tokens_now} token(s) and {usd(cost_now)} "
                "already spent; it was not submitted (raise the budget in the workflow's `budget:` or the run "
                "config's resources.budget)")
        return tokens, cost

    async def settle(self, scope: Any, estimate: tuple[int, float] | None, spent: Usage) -> None:
        """Replace the batch's estimate in the run's account by what its answers cost."""
        if estimate is None:
            return
        tokens = spent.prompt_tokens + spent.completion_tokens - estimate[0]
        cost = spent.cost_usd - estimate[1]
        if scope.store is not None:
            await scope.store.arun(adjust_spend, scope.store, scope.run_id, tokens, cost)
        else:
            account = scope.run.budget(scope.budget, scope.store)
            account.spent = account.spent + Usage(prompt_tokens=tokens, cost_usd=cost)

    # -- waiting --
    async def follow(self, api: Any, batch_id: str, group: list[Parked], estimate: tuple[int, float] | None,
                     resubmitted: bool = False) -> None:
        """Wait for the batch to end, then answer its calls; resubmit what it did not run when the policy says so."""
        scope = group[0].call.scope
        started, delay, errors, shown = time.monotonic(), FIRST_POLL_SECONDS, 0, None
        self.live[batch_id] = scope
        while True:
            try:
                batch = await api.retrieve(batch_id)
                errors = 0
            except LLMError as exc:
                errors += 1
                if not exc.retryable or errors >= MAX_POLL_ERRORS:
                    raise
                self.collector.log.warning(f"{scope.task}: reading batch {batch_id} failed ({exc}); trying again")
                batch = None
            if batch is not None:
                counts = batch.request_counts
                progress = (batch.status, counts.completed if counts else 0, counts.failed if counts else 0)
                if progress != shown:
                    shown = progress
                    total = counts.total if counts else len(group)
                    self.collector.log.info(f"{scope.task}: batch {batch_id} {batch.status}, {progress[1]} of {total} "
                                            f"request(s) done, {progress[2]} failed")
                if batch.status in DONE:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, poll_seconds())
        self.live.pop(batch_id, None)
        unrun, spent = await self.read(api, batch, group, time.monotonic() - started)
        await self.settle(scope, estimate, spent)
        if scope.store is not None:  # read: a later attempt asks again (a retry, a repair) rather than re-read it
            await scope.store.arun(mark_batch, scope.store, scope.root_run_id, scope.task, batch_id, "read")
        if not unrun:
            return
        if batch.status == "failed":
            first = (batch.errors.data or [None])[0] if batch.errors else None
            why = f"{first.code}: {first.message}" if first is not None else "no reason given"
            self.fail(unrun, LLMError(f"batch {batch_id} of task {scope.task} failed at {api.base_url} ({why})",
                                      kind="bad_request"))
            return
        if batch.status == "expired" and self.collector.settings.on_expiry == "resubmit" and not resubmitted:
            self.collector.log.warning(f"{scope.task}: batch {batch_id} expired with {len(unrun)} request(s) not run; "
                                       "resubmitting them once (batch_on_expiry: resubmit)")
            for batch_id2, group2, estimate2 in await self.submit(api, unrun, resubmission=True):
                await self.follow(api, batch_id2, group2, estimate2, resubmitted=True)
            return
        policy = "expired" if batch.status == "expired" else batch.status
        self.fail(unrun, LLMError(f"batch {batch_id} of task {scope.task} {policy} before this request ran "
                                  f"(batch_on_expiry: {self.collector.settings.on_expiry})",
                                  kind="timeout" if policy == "expired" else "server_error"))

    async def read(self, api: Any, batch: Any, group: list[Parked], waited: float) -> tuple[list[Parked], Usage]:
        """Answer the calls from the batch's output and error files; the calls it did not run, and what was spent."""
        by_id = {one.custom_id: one for one in group}
        lines: dict[str, dict[str, Any]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for text in (await api.content(file_id)).decode().splitlines():
                    if text.strip():
                        entry = json.loads(text)
                        lines[str(entry.get("custom_id"))] = entry
        spent, unrun = Usage(), []
        table = current_prices()
        for custom_id, one in by_id.items():
            entry = lines.get(custom_id)
            error = (entry or {}).get("error") or {}
            if entry is None or error.get("code") in UNRUN:
                unrun.append(one)
                continue
            response = entry.get("response") or {}
            status, body = response.get("status_code"), response.get("body")
            request = one.call.request
            if status != 200:
                message = ((body or {}).get("error") or {}).get("message") if isinstance(body, dict) else None
                message = message or error.get("message") or "no detail"
                kind = "rate_limit" if status == 429 else "server_error" if not status or status >= 500 else "bad_request"
                self.finish(one, error=LLMError(f"LLM call {request.label} in batch {batch.id} failed with HTTP "
                                                f"{status}: {message}", kind=kind, status_code=status, attempts=1))
                continue
            try:
                result = api.result(body, request)
            except LLMError as exc:
                if exc.result is not None:
                    exc.result = _batch_priced(exc.result, request.model, table, waited)
                    exc.usage = _usage(exc.result, table, request.model)
                    spent = spent + exc.usage
                self.finish(one, error=exc)
                continue
            result = _batch_priced(result, request.model, table, waited)
            usage = _usage(result, table, request.model)
            spent = spent + usage
            self.finish(one, answer=Answer(result, usage))
        return unrun, spent

    async def cancel_all(self) -> None:
        """Cancel the batches still running (the step is being stopped), marked first so that no later attempt
        follows them."""
        for batch_id, scope in list(self.live.items()):
            try:
                if scope.store is not None:
                    await scope.store.arun(mark_batch, scope.store, scope.root_run_id, scope.task, batch_id,
                                           "cancelled")
                if self.api is not None:
                    await asyncio.wait_for(self.api.cancel(batch_id), CANCEL_SECONDS)
                self.live.pop(batch_id, None)
                self.collector.log.warning(f"{scope.task}: cancelled batch {batch_id} (the run is being stopped)")
            except Exception as exc:  # noqa: BLE001 - stopping goes on; the process's exit tries once more
                self.collector.log.warning(f"{scope.task}: could not cancel batch {batch_id} yet: {exc}")

    def cancel_now(self, batch_id: str, scope: Any) -> None:
        """Cancel one batch from a thread without the event loop (the process is exiting)."""
        try:
            if scope.store is not None:
                mark_batch(scope.store, scope.root_run_id, scope.task, batch_id, "cancelled")
            if self.api is not None:
                self.api.cancel_now(batch_id, CANCEL_SECONDS)
            self.live.pop(batch_id, None)
            self.collector.log.warning(f"{scope.task}: cancelled batch {batch_id} (the process is stopping)")
        except Exception as exc:  # noqa: BLE001 - the batch expires within 24 h; its answers are never read
            self.collector.log.warning(f"{scope.task}: could not cancel batch {batch_id}: {exc}")


def _batch_priced(result: LLMResult, requested: str, table: Any, waited: float) -> LLMResult:
    cost = table.batch_cost(result.model, result.prompt_tokens, result.completion_tokens, requested)
    return replace(result, cost_usd=cost, latency_s=waited)


def _usage(result: LLMResult, table: Any, requested: str) -> Usage:
    online = table.cost(result.model, result.prompt_tokens, result.completion_tokens, requested)
    return Usage(calls=1, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 latency_s=result.latency_s, cost_usd=result.cost_usd, batch_requests=1,
                 batch_saving_usd=max(0.0, online - result.cost_usd))
