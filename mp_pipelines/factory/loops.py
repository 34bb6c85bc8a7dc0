"""Depth: a bounded loop unrolled into ops `task__1 … task__N` that pass a loop state along, inside the loop's graph
(factory/assets.py makes it one asset per body task plus the loop's result).

Every body op has a `next` output feeding the following op; the op that evaluates `until` (and the
last op of the last iteration) also has a `done` output. When `until` holds, the op yields only
`done`, so Dagster skips every later op of the loop, and the loop's collector (a fan-in of all
`done` outputs, which Dagster runs when at least one source is present) publishes the result and each body
task's latest answer, as the outputs of the loop's assets.
"""


from typing import Any, Iterator, Mapping

import dagster as dg

from mp_pipelines.calls.usage import Usage
from mp_pipelines.factory.names import LOOP_TAG, PROMPT_RESOURCE_KEYS, WORKFLOW_TAG, body_local, body_step, loop_step
from mp_pipelines.factory.ops import (
    asset_metadata,
    call_metadata,
    call_model,
    check_condition,
    make_op,
    retry_policy,
    split_inputs,
    task_deadline,
    upstream_ins,
)
from mp_pipelines.spec.graph import loop_iterations, until_gate
from mp_pipelines.spec.models import LoopSpec, WorkflowSpec
from mp_pipelines.spec.templates import TemplateError, evaluate
from mp_pipelines.tasks.runner import build_context


def _start_iteration(state: Mapping[str, Any] | None, iteration: int) -> dict[str, Any]:
    if state is None:
        return {"iteration": iteration, "current": {}, "previous": None, "latest": {}, "stopped_early": False,
                "usage": Usage().as_dict()}
    if state["iteration"] == iteration:
        return dict(state)
    return {**state, "iteration": iteration, "current": {}, "previous": state["current"]}


def build_body_op(spec: WorkflowSpec, loop: LoopSpec, index: int, iteration: int,
                  external: list[str], pool: str | None = None) -> dg.OpDefinition:
    """The op of body task `index` in iteration `iteration`."""
    task = loop.tasks[index]
    total = loop_iterations(spec, loop)
    final = iteration == total and index == len(loop.tasks) - 1
    checks_until = index == until_gate(loop) and loop.loop.until is not None
    outs = {}
    if not final:
        outs["next"] = dg.Out(dg.Any, is_required=not checks_until)
    if final or checks_until:
        outs["done"] = dg.Out(dg.Any, is_required=final and not checks_until)
    label = f"{loop.name}.{task.name}#{iteration}"

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        workflow_inputs, values = split_inputs(inputs)
        state = _start_iteration(values.pop("state", None), iteration)
        loop_vars = {"iteration": iteration, "max_iterations": total, "previous": state["previous"]}
        template_context = build_context(spec, workflow_inputs, {**values, **state["current"]}, loop=loop_vars)
        if check_condition(context, task, template_context, label):
            run = call_model(context, spec, task, template_context, label=label, deadline=task_deadline(task))
            metadata = {**call_metadata(run), "iteration": iteration}
            state["current"] = {**state["current"], task.name: run.output}
            state["latest"] = {**state["latest"], task.name: run.output}
            state["usage"] = (Usage(**state["usage"]) + run.usage).as_dict()
            state.setdefault("answered", {})[task.name] = {"iteration": iteration, **call_metadata(run)}
        else:
            state["current"] = {**state["current"], task.name: None}  # later body tasks read none, not undefined
            metadata = {"iteration": iteration, "skipped": True}
        if checks_until and _until(loop, {**template_context, **state["current"]}, label):
            context.log.info(f"{loop.name}: `until: {loop.loop.until}` holds after iteration {iteration}; stopping")
            yield dg.Output({**state, "stopped_early": not final}, "done", metadata=metadata)
        elif final:
            yield dg.Output(state, "done", metadata=metadata)
        else:
            yield dg.Output(state, "next", metadata=metadata)

    ins = upstream_ins(external)
    if iteration > 1 or index > 0:
        ins["state"] = dg.In(dg.Any)
    return make_op(spec, body_local(task.name, iteration), compute, step=body_step(spec.name, loop.name, task.name, iteration),
                   ins=ins, outs=outs,
                   description=f"{task.description or task.name} (loop {loop.name}, iteration {iteration}/{total})",
                   retry_policy=retry_policy(task), required_resource_keys=PROMPT_RESOURCE_KEYS, pool=pool,
                   tags={WORKFLOW_TAG: spec.name, LOOP_TAG: loop.name})


def _until(loop: LoopSpec, template_context: Mapping[str, Any], label: str) -> bool:
    try:
        return evaluate(loop.loop.until or "false", dict(template_context))
    except TemplateError as exc:
        raise dg.Failure(f"{label}: `until` could not be evaluated: {exc}", allow_retries=False) from None


def result_local(loop: str) -> str:
    """The loop result op's own name; its node in the loop's graph is the loop's name."""
    return f"{loop}__result"


def build_loop_result_op(spec: WorkflowSpec, loop: LoopSpec) -> dg.OpDefinition:
    """The loop's collector: takes the one state that finished and publishes the latest body outputs, as the output
    named after the loop (the loop's asset) and one output per body task (its asset; absent when it never ran)."""

    def compute(context: dg.OpExecutionContext, inputs: Mapping[str, Any]) -> Iterator[Any]:
        (state,) = inputs["states"]  # exactly one iteration ends the loop; the others are skipped
        value = state["latest"]
        usage = Usage(**state["usage"])
        context.log.info(f"{loop.name}: ran {state['iteration']} iteration(s)"
                         + (", stopped early" if state["stopped_early"] else ""))
        iterations = {"iterations": state["iteration"], "stopped_early": state["stopped_early"]}
        answered = state.get("answered", {})
        for task in loop.tasks:
            if task.name in value:
                # The answer's own call, without `llm/` usage: the body step that made it counted that already.
                own = {k: v for k, v in asset_metadata(answered.get(task.name, {}), value[task.name]).items()
                       if not k.startswith("llm/")}
                yield dg.Output(value[task.name], task.name, metadata={**own, **iterations})
        summary = {k: v for k, v in asset_metadata(usage.as_metadata(), value).items() if not k.startswith("llm/")}
        yield dg.Output(value, loop.name, metadata={**summary, **iterations})

    # Output names are the loop's and its tasks' names (unique in a workflow).
    outs = {loop.name: dg.Out(dg.Any), **{task.name: dg.Out(dg.Any, is_required=False) for task in loop.tasks}}
    return make_op(spec, result_local(loop.name), compute, step=loop_step(spec.name, loop.name),
                   ins={"states": dg.In(dg.List[dg.Any])}, outs=outs,
                   description=loop.description or f"Result of loop {loop.name}.", tags={WORKFLOW_TAG: spec.name})
