"""What one prompt task does when it runs: render, call the model, check the answer, account usage.

No Dagster here: ops in `factory/` are thin shells around these functions.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from mp_pipelines.calls.loop import shared_loop
from mp_pipelines.calls.store import SHARED, Entry, checkpoint_key, request_key
from mp_pipelines.calls.path import CallScope, acall
from mp_pipelines.llm.client import LLMError, LLMRequest, LLMResult
from mp_pipelines.spec.templates import evaluate, render
from mp_pipelines.calls.usage import Usage
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec

PREVIEW_CHARS = 500


class TaskTimeout(RuntimeError):
    """A task used up its `timeout` before its model call could finish."""


@dataclass(frozen=True)
class TaskRun:
    """The outcome of one prompt: the output value and how it was obtained."""

    output: Any
    usage: Usage
    model: str
    provider: str
    finish_reason: str | None
    attempts: int


def template_value(value: Any) -> Any:
    """A value as templates see it: DataFrames become lists of row dicts."""
    if hasattr(value, "to_dict") and hasattr(value, "columns"):
        return records(value)
    return value


def records(frame: Any) -> list[dict[str, Any]]:
    """Rows of a DataFrame as dicts, with missing values as None (not NaN)."""
    rows = frame.to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]


def build_context(
    spec: WorkflowSpec,
    inputs: Mapping[str, Any],
    upstream: Mapping[str, Any],
    **specials: Any,
) -> dict[str, Any]:
    """The template context: inputs, upstream step outputs by name, and specials (item, loop)."""
    context: dict[str, Any] = {name: template_value(value) for name, value in upstream.items()}
    context["inputs"] = dict(inputs)
    context["workflow"] = {"name": spec.name, "description": spec.description}
    context.update(specials)
    return context


def condition_holds(task: TaskSpec, context: Mapping[str, Any]) -> bool:
    """True when the task has no `when`, or its `when` expression is true in `context`."""
    return task.when is None or evaluate(task.when, dict(context))


def build_request(spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any], *, default_model: str,
                  timeout: float | None, label: str) -> LLMRequest:
    """Render the task's messages and settings into one request (TemplateError on bad templates)."""
    settings = spec.settings_for(task)
    messages = []
    if settings.system:
        messages.append({"role": "system", "content": render(settings.system, dict(context))})
    messages.append({"role": "user", "content": render(task.prompt, dict(context))})
    return LLMRequest(
        messages=messages,
        model=settings.model or default_model,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        json_output=task.output == "json",
        json_schema=task.output_schema,
        timeout=timeout,
        label=label,
    )


def remaining_time(deadline: float | None, label: str) -> float | None:
    """Seconds left before `deadline` (a time.monotonic() value); TaskTimeout when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TaskTimeout(f"task {label} used up its timeout before calling the model")
    return left


async def arun_task(llm: Any, spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any], *, label: str,
                    scope: CallScope, deadline: float | None = None) -> TaskRun:
    """The task's answer for `context`: from the cache or checkpoint when allowed, else from the model
    (invalid JSON sent back for repair), under the scope's limits; nothing outlives the task's deadline.

    Runs on the shared loop: waiting for a limiter slot counts against the deadline too.
    """
    left = remaining_time(deadline, label)
    timeout = llm.timeout if left is None else min(llm.timeout, left)
    request = build_request(spec, task, context, default_model=llm.default_model, timeout=timeout, label=label)
    shareable = scope.cache_policy == "read_write"  # an identical call in flight may answer this one too
    key = request_key(request, llm.endpoint_key()) if scope.store is not None or shareable else ""
    answer = await _stored_answer(scope, key, label)
    if answer is None and shareable:
        answer = await _answer_of_identical_call(key)
    if answer is None:
        leading = _lead(key) if shareable else None
        try:
            answer = await _model_answer(llm, task, request, scope, left=left, deadline=deadline, label=label)
        except BaseException:
            _followers_on_their_own(key, leading)
            raise
        _remember(scope, key, label, answer)
        if leading is not None:
            _answered(key, leading, answer.result)
    result = answer.result
    output = result.parsed if request.json_output else result.text
    return TaskRun(output, answer.usage, result.model, result.provider, result.finish_reason, result.attempts)


async def _model_answer(llm: Any, task: TaskSpec, request: LLMRequest, scope: CallScope, *, left: float | None,
                        deadline: float | None, label: str) -> Answer:
    """The model's answer within the task's time left; TaskTimeout once the task's deadline has passed."""
    try:
        if left is None:
            return await _answer(llm, task, request, scope)
        return await asyncio.wait_for(_answer(llm, task, request, scope), left)
    except asyncio.TimeoutError:
        raise TaskTimeout(f"task {label} exceeded its timeout of {task.timeout:g} s waiting for the model") from None
    except LLMError as exc:
        if exc.kind == "timeout" and deadline is not None and time.monotonic() >= deadline:
            raise TaskTimeout(f"task {label} exceeded its timeout of {task.timeout:g} s: {exc}") from None
        raise


async def _stored_answer(scope: CallScope, key: str, label: str) -> Answer | None:
    """A stored answer this call may use: its run family's checkpoint when resuming, then the shared cache."""
    if scope.store is None:
        return None
    found = None
    if scope.resuming:
        found = await scope.store.aget(scope.root_run_id, checkpoint_key(key, label))
    # On resume the shared cache also holds the family's answers when the policy wrote them there (`write`).
    if found is None and (scope.cache_policy in ("read_write", "read") or (scope.resuming and scope.cache_policy == "write")):
        found = await scope.store.aget(SHARED, key)
    return None if found is None else Answer(found, Usage(cache_hits=1))


# Calls that may share their answer (cache policy read_write), by request key, while they are in flight on the
# shared loop: an identical request (the same item twice in a fan-out, two runs asking the same) waits for the
# first one's answer instead of paying for it again, as a cache hit would.
_IDENTICAL: dict[str, asyncio.Future[LLMResult]] = {}


async def _answer_of_identical_call(key: str) -> Answer | None:
    """The answer of an identical call in flight, once it arrives; None if there is none or it failed."""
    leader = _IDENTICAL.get(key)
    if leader is None or leader.get_loop() is not asyncio.get_running_loop():
        return None  # (calls on another event loop, e.g. a test's own, cannot wait for this one's future)
    try:
        result = await asyncio.shield(leader)
    except asyncio.CancelledError:
        if not leader.cancelled():
            raise  # this task itself is being cancelled
        return None
    except Exception:  # noqa: BLE001 - the leader's failure is its own: this call is made anew
        return None
    return Answer(replace(result, latency_s=0.0, attempts=0, cached=True), Usage(cache_hits=1))


def _lead(key: str) -> asyncio.Future[LLMResult]:
    """Register this call as the one identical requests wait for."""
    leader = _IDENTICAL[key] = asyncio.get_running_loop().create_future()
    return leader


def _answered(key: str, leader: asyncio.Future[LLMResult], result: LLMResult) -> None:
    """The leading call got its answer: hand it to whoever waited."""
    if _IDENTICAL.get(key) is leader:
        del _IDENTICAL[key]
    leader.set_result(result)


def _followers_on_their_own(key: str, leader: asyncio.Future[LLMResult] | None) -> None:
    """The leading call failed or was cancelled: whoever waited for it makes its own call."""
    if leader is not None:
        if _IDENTICAL.get(key) is leader:
            del _IDENTICAL[key]
        leader.cancel()


def _remember(scope: CallScope, key: str, label: str, answer: Answer) -> None:
    """Keep a new answer: in the shared cache when the policy writes, else in the run family's checkpoint."""
    if scope.store is None or answer.result.cached:
        return
    shared = scope.cache_policy in ("read_write", "write")
    entry_key = key if shared else checkpoint_key(key, label)
    scope.store.put(Entry(SHARED if shared else scope.root_run_id, entry_key, scope.workflow, scope.task,
                          answer.result))


@dataclass(frozen=True)
class Answer:
    """A usable answer and everything it took to get it (a repaired answer counts every call)."""

    result: LLMResult
    usage: Usage


async def _answer(llm: Any, task: TaskSpec, request: LLMRequest, scope: CallScope) -> Answer:
    """Call the model; an answer that is not the JSON asked for goes back with what is wrong with it, up to
    `task.repair_attempts` times. The last failure carries the usage of every call (`exc.usage`)."""
    usage = Usage()
    for repair in range(task.repair_attempts + 1):
        try:
            result = await acall(llm, request, scope)
        except LLMError as exc:
            spent = usage + (Usage.of_result(exc.result) if exc.result is not None else Usage())
            exc.usage = spent  # type: ignore[attr-defined]
            if exc.kind != "invalid_output" or exc.result is None or repair == task.repair_attempts:
                raise
            usage = spent
            request = replace(request, messages=[*request.messages, {"role": "assistant", "content": exc.result.text},
                                                 {"role": "user", "content": repair_prompt(exc, request)}])
            continue
        return Answer(result, usage + Usage.of_result(result))
    raise AssertionError("unreachable: the last repair attempt returns or raises")


def repair_prompt(exc: LLMError, request: LLMRequest) -> str:
    """What the model is told when its JSON answer cannot be used."""
    schema = ""
    if request.json_schema is not None:
        schema = " It must match this JSON schema:\n" + json.dumps(request.json_schema, ensure_ascii=False)
    return (f"Your answer cannot be used: {exc.detail or exc}. Reply again with only the corrected JSON, "
            f"no other text.{schema}")


def run_task(llm: Any, spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any], *, label: str,
             scope: CallScope, deadline: float | None = None,
             should_stop: Callable[[], bool] | None = None) -> TaskRun:
    """`arun_task` from a synchronous op: run it on the shared loop and wait (cancelled by `should_stop`)."""
    coro = arun_task(llm, spec, task, context, label=label, scope=scope, deadline=deadline)
    return shared_loop().run(coro, should_stop=should_stop)


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A short text preview of an output for metadata and the CLI."""
    if hasattr(value, "head") and hasattr(value, "columns"):
        text = value.head(10).to_string()
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str, indent=1)
    return text if len(text) <= limit else text[: limit - 1] + "…"
