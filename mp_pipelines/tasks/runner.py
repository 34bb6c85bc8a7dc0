"""What one prompt task does when it runs: render its messages, get the answer through the call path.

No Dagster here: ops in `factory/` are thin shells around these functions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from mp_pipelines.calls import path as call_path
from mp_pipelines.calls.call import CallScope
from mp_pipelines.calls.deadline import TaskTimeout, remaining_time
from mp_pipelines.calls.loop import shared_loop
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import ChatModel, LLMRequest
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec
from mp_pipelines.spec.templates import RenderTimeout, evaluate, render

PREVIEW_CHARS = 500


@dataclass(frozen=True)
class TaskRun:
    """The outcome of one prompt: the output value and how it was obtained."""

    output: Any
    usage: Usage
    model: str  # the model that answered, as the workflow names it (`model` or `provider/model`)
    provider: str  # the named provider that answered, else the LLM resource's ("openai", "simulated")
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
                  timeout: float | None, label: str, deadline: float | None = None) -> LLMRequest:
    """Render the task's messages and settings into one request (TemplateError on bad templates).

    Rendering stops at the task's `deadline` (a time.monotonic() value) with TaskTimeout.
    """
    settings = spec.settings_for(task)
    messages = []
    try:
        if settings.system:
            messages.append({"role": "system", "content": render(settings.system, dict(context), deadline=deadline,
                                                                 library=spec.prompt_library)})
        messages.append({"role": "user", "content": render(task.prompt, dict(context), deadline=deadline,
                                                           library=spec.prompt_library)})
    except RenderTimeout as exc:
        if deadline is None or time.monotonic() < deadline:
            raise  # the sandbox's own bound on one render, not the task's timeout
        raise TaskTimeout(f"task {label} used up its timeout while rendering its prompt: {exc}") from None
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


async def arun_task(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any], *, label: str,
                    scope: CallScope, deadline: float | None = None) -> TaskRun:
    """The task's answer for `context`, through the call path (cache, limits, budget, repair, the model);
    nothing outlives the task's deadline. Runs on the shared loop.

    In batch mode the task's `timeout` does not bound the wait: the Batch API's 24-hour window does."""
    if scope.batch is not None:
        deadline = None
    left = remaining_time(deadline, label)
    timeout = model.timeout if left is None else min(model.timeout, left)
    request = build_request(spec, task, context, default_model=model.default_model, timeout=timeout, label=label,
                            deadline=deadline)
    ref, provider = request.model, None
    if scope.router is not None:  # `provider/model` of a declared provider goes to that provider's endpoint
        provider, model_id = scope.router.split(ref)
        if provider is not None:
            model, _ = scope.router.route(ref)
            request = replace(request, model=model_id)
    answer = await call_path.answer(model, request, scope, deadline=deadline)
    result = answer.result
    output = result.parsed if request.json_output else result.text
    if answer.model:  # a fallback answered
        ref = answer.model
        provider = scope.router.split(ref)[0] if scope.router is not None else None
    return TaskRun(output, answer.usage, ref, provider or result.provider, result.finish_reason, result.attempts)


def run_task(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, context: Mapping[str, Any], *, label: str,
             scope: CallScope, deadline: float | None = None,
             should_stop: Callable[[], bool] | None = None) -> TaskRun:
    """`arun_task` from a synchronous op: run it on the shared loop and wait (cancelled by `should_stop`)."""
    coro = arun_task(model, spec, task, context, label=label, scope=scope, deadline=deadline)
    if scope.batch is not None:
        coro = _one_item(coro, scope)
    return shared_loop().run(coro, should_stop=should_stop)


async def _one_item(coro: Any, scope: CallScope) -> TaskRun:
    """A single task's call in batch mode: its step's only item."""
    assert scope.batch is not None
    scope.batch.expect(1)
    try:
        return await coro
    finally:
        scope.batch.item_done()


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A short text preview of an output for metadata and the CLI."""
    if hasattr(value, "head") and hasattr(value, "columns"):
        text = value.head(10).to_string()
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str, indent=1)
    return text if len(text) <= limit else text[: limit - 1] + "…"
