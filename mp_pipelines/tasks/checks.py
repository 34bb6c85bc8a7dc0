"""Quality checks over a task's stored answers (`checks:` on a task, spec/checks.py), without Dagster.

A task's value holds one answer, or a fan-out's answers in input order (a list, or a table's rows with their
result columns). Each check looks at every answer and passes when at least `min_ratio` of them pass (default:
all); `unique_ratio` looks at them together. `judge` asks a model to score each answer against a rubric through
the same call path as the task's own calls (cache, budget, limits, retries, pricing), its usage kept apart.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mp_pipelines.calls.call import CallScope
from mp_pipelines.calls.loop import shared_loop
from mp_pipelines.calls.usage import Usage
from mp_pipelines.llm.types import ChatModel, LLMError
from mp_pipelines.spec.checks import CheckSpec, check_names
from mp_pipelines.spec.models import TaskSpec, WorkflowSpec
from mp_pipelines.tasks.runner import arun_task, preview

LISTED_ITEMS = 20  # failing answers named in a check's metadata and message
LISTED_SCORES = 1000  # judge scores listed in metadata; the mean covers every answer
JUDGE_MAX_TOKENS = 300
JUDGE_ANSWER_CHARS = 20_000  # the part of an answer a judge sees
JUDGE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                                                 "reason": {"type": "string"}},
                "required": ["score", "reason"], "additionalProperties": False}
JUDGE_SYSTEM = ("You grade an answer against a rubric. Score it from 1 (fails the rubric) to 5 (fully meets it) and "
                'reply with JSON only: {"score": <1-5>, "reason": "<one sentence>"}.')


@dataclass(frozen=True)
class TaskAnswer:
    """One answer to check: a fan-out item's (with its input index) or a plain task's (index None)."""

    index: int | None
    value: Any

    def label(self, task: str) -> str:
        return task if self.index is None else f"{task}[{self.index}]"


@dataclass
class CheckOutcome:
    """The result of one check: what an asset check result shows, and `run --json` reports."""

    name: str
    type: str
    passed: bool
    severity: str  # warn | error
    blocking: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-ready
    usage: Usage = field(default_factory=Usage)  # a judge's calls (none for the other checks)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "severity": self.severity, "metadata": self.metadata}


@dataclass(frozen=True)
class Verdict:
    """One answer's result under one check."""

    answer: TaskAnswer
    passed: bool
    reason: str = ""
    score: float | None = None  # a judge's


def task_answers(task: TaskSpec, value: Any, indices: Sequence[int] | None = None) -> tuple[list[TaskAnswer], int]:
    """The answers of a task's stored value and how many fan-out items it skipped (`when` false): a plain task's
    value is one answer; a fan-out's list or table has one per item. `indices` gives each entry's input index
    (with `on_item_failure: skip` the failed items are left out of the value); default: its position."""
    if task.for_each is None:
        return [TaskAnswer(None, value)], 0
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # a fan-out over a table: rows with result columns
        entries = value.to_dict(orient="records")
        kept = [(i, _row_answer(task, row)) for i, row in enumerate(entries)
                if row.get("item_status", "success") == "success"]
    else:
        entries = list(value or [])
        kept = [(i, item) for i, item in enumerate(entries) if item is not None]
    number = list(indices) if indices is not None and len(indices) == len(entries) else list(range(len(entries)))
    return [TaskAnswer(number[i], answer) for i, answer in kept], len(entries) - len(kept)


def _row_answer(task: TaskSpec, row: Mapping[str, Any]) -> Any:
    """A table row's answer: its `result` column, or the columns the task's output_schema names."""
    if "result" in row:
        return row["result"]
    names = list(((task.output_schema or {}).get("properties") or {}))
    if not names:
        return {k: v for k, v in row.items() if k != "item_status"}
    return {name: row.get(f"result_{name}", row.get(name)) for name in names}


def answer_text(value: Any) -> str:
    """An answer as text: itself when it is text, else its JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _canonical(value: Any) -> str:
    return answer_text(value.strip() if isinstance(value, str) else value)


# One function per check type: (check, answer) → (passed, why not).
def _non_empty(check: CheckSpec, value: Any) -> tuple[bool, str]:
    empty = value is None or (isinstance(value, str) and not value.strip()) or value in ([], {})
    return not empty, "the answer is empty"


def _max_chars(check: CheckSpec, value: Any) -> tuple[bool, str]:
    size = len(answer_text(value))
    return size <= (check.value or 0), f"{size:,} characters, more than {check.value:,}"


def _min_chars(check: CheckSpec, value: Any) -> tuple[bool, str]:
    size = len(answer_text(value))
    return size >= (check.value or 0), f"{size:,} characters, fewer than {check.value:,}"


def _matches(check: CheckSpec, value: Any) -> tuple[bool, str]:
    return re.search(check.pattern or "", answer_text(value)) is not None, f"does not match {check.pattern!r}"


def _in_set(check: CheckSpec, value: Any) -> tuple[bool, str]:
    allowed = check.values or []
    found = value in allowed or (isinstance(value, str) and value.strip() in allowed)
    return found, f"{preview(value, 60)!r} is not one of {answer_text(allowed)[:120]}"


def _json_schema(schema: Mapping[str, Any]) -> Callable[[CheckSpec, Any], tuple[bool, str]]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)

    def check_one(check: CheckSpec, value: Any) -> tuple[bool, str]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return False, "the answer is not JSON"
        error = next(iter(validator.iter_errors(value)), None)
        if error is None:
            return True, ""
        where = "/".join(str(p) for p in error.absolute_path)
        return False, (f"at /{where}: " if where else "") + error.message[:200]

    return check_one


_PER_ANSWER: dict[str, Callable[[CheckSpec, Any], tuple[bool, str]]] = {
    "non_empty": _non_empty, "max_chars": _max_chars, "min_chars": _min_chars, "matches": _matches, "in_set": _in_set,
}


def _verdicts(check: CheckSpec, task: TaskSpec, answers: Sequence[TaskAnswer]) -> list[Verdict]:
    """Every answer's verdict under a check that looks at answers one by one (not judge, not unique_ratio)."""
    if check.type == "json_schema":
        schema = check.schema_ if check.schema_ is not None else task.output_schema or {}
        one = _json_schema(schema)
    else:
        one = _PER_ANSWER[check.type]
    out = []
    for answer in answers:
        passed, why = one(check, answer.value)
        out.append(Verdict(answer, passed, "" if passed else why))
    return out


def _duplicates(answers: Sequence[TaskAnswer]) -> list[Verdict]:
    """unique_ratio: an answer fails when an earlier one says the same (whitespace around text ignored)."""
    first: dict[str, int | None] = {}
    out = []
    for answer in answers:
        key = _canonical(answer.value)
        if key in first:
            earlier = first[key]
            out.append(Verdict(answer, False, "same answer as " + ("the task" if earlier is None else f"[{earlier}]")))
        else:
            first[key] = answer.index
            out.append(Verdict(answer, True))
    return out


@dataclass(frozen=True)
class Judged:
    """A judge's verdicts and the usage of its calls."""

    verdicts: list[Verdict]
    usage: Usage


def parse_score(answer: Any) -> float | None:
    """A judge's score 1–5 from its answer: the JSON's `score`, else a score written in the text; None if none."""
    if isinstance(answer, Mapping):
        raw = answer.get("score", answer.get("rating"))
        try:
            score = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            score = None
        if score is not None:
            return score if 1 <= score <= 5 else None
        answer = json.dumps(answer)
    text = str(answer or "")
    try:
        decoded = json.loads(text)
        if isinstance(decoded, Mapping):
            return parse_score(decoded)
    except ValueError:
        pass
    match = re.search(r"score\W{0,4}([1-5](?:\.\d+)?)\b", text, re.IGNORECASE) or \
        re.search(r"(?<![\d.])([1-5])(?:\s*/\s*5)?(?![\d.])", text)
    return float(match.group(1)) if match else None


def judge_task(spec: WorkflowSpec, task: TaskSpec) -> TaskSpec:
    """The pseudo-task a judge's calls run as: the task's model, provider, cache policy, retries and fallbacks, at
    temperature 0, with the judge's own messages and a JSON answer {score, reason}."""
    settings = spec.settings_for(task)
    return TaskSpec(name=task.name, prompt="{{ judge_prompt }}", system=JUDGE_SYSTEM, model=settings.model,
                    temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, output="json", output_schema=JUDGE_SCHEMA,
                    cache=task.cache, fallback=task.fallback, retries=task.retries, mode="online", repair_attempts=1)


def judge_prompt(rubric: str, value: Any) -> str:
    text = answer_text(value)
    if len(text) > JUDGE_ANSWER_CHARS:
        text = text[:JUDGE_ANSWER_CHARS] + " […]"
    return f"Rubric:\n{rubric}\n\nAnswer:\n{text}"


async def ajudge(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, check: CheckSpec, name: str,
                 answers: Sequence[TaskAnswer], scope: CallScope) -> Judged:
    """Score every answer, at most the workflow's breadth at once; an answer the judge scores unreadably fails.

    Errors that stop calls (the budget, a refused key) are raised as themselves."""
    judge = judge_task(spec, task)
    gate = asyncio.Semaphore(spec.breadth)

    async def one(answer: TaskAnswer) -> tuple[Verdict, Usage]:
        label = f"{answer.label(task.name)} judge {name}"
        async with gate:
            try:
                run = await arun_task(model, spec, judge, {"judge_prompt": judge_prompt(check.rubric or "", answer.value)},
                                      label=label, scope=scope)
            except LLMError as exc:
                if exc.kind != "invalid_output":
                    raise
                # An answer that is not the JSON asked for may still say its score.
                usage = exc.usage or Usage()
                text = exc.result.text if exc.result is not None else ""
                return _scored(check, answer, parse_score(text), ""), usage
        reason = str(run.output.get("reason", "")) if isinstance(run.output, Mapping) else ""
        return _scored(check, answer, parse_score(run.output), reason), run.usage

    # A TaskGroup, not gather: when one call raises (the budget), the others are cancelled, not left running.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(answer)) for answer in answers]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    results = [task.result() for task in tasks]
    return Judged([verdict for verdict, _ in results], sum((usage for _, usage in results), Usage()))


def _scored(check: CheckSpec, answer: TaskAnswer, score: float | None, reason: str) -> Verdict:
    if score is None:
        return Verdict(answer, False, "the judge gave no score from 1 to 5")
    passed = score >= check.score_threshold
    why = f"score {score:g} below {check.score_threshold:g}" + (f": {reason[:200]}" if reason else "")
    return Verdict(answer, passed, "" if passed else why, score)


def judge(model: ChatModel, spec: WorkflowSpec, task: TaskSpec, check: CheckSpec, name: str,
          answers: Sequence[TaskAnswer], scope: CallScope, should_stop: Callable[[], bool] | None = None) -> Judged:
    """`ajudge` from synchronous code, on the shared loop."""
    return shared_loop().run(ajudge(model, spec, task, check, name, answers, scope), should_stop=should_stop)


def evaluate(task: TaskSpec, check: CheckSpec, name: str, answers: Sequence[TaskAnswer], skipped: int = 0,
             judged: Judged | None = None) -> CheckOutcome:
    """The outcome of one check over a task's answers (a judge's verdicts come from `judge`)."""
    if check.type == "judge":
        if judged is None:
            raise ValueError("a judge check needs its verdicts (tasks.checks.judge)")
        verdicts = judged.verdicts
    elif check.type == "unique_ratio":
        verdicts = _duplicates(answers)
    else:
        verdicts = _verdicts(check, task, answers)
    good = sum(v.passed for v in verdicts)
    total = len(verdicts)
    ratio = good / total if total else 1.0
    passed = ratio >= check.ratio_threshold
    failing = [v for v in verdicts if not v.passed]
    metadata: dict[str, Any] = {"type": check.type, "answers": total, "passed_answers": good,
                                "failed_answers": len(failing), "ratio": round(ratio, 4),
                                "min_ratio": check.ratio_threshold, **_parameters(check, task)}
    if skipped:
        metadata["skipped_items"] = skipped
    if failing:
        metadata["failing_items"] = [{"item": v.answer.label(task.name), "index": v.answer.index, "reason": v.reason,
                                      "answer": preview(v.answer.value, 200)} for v in failing[:LISTED_ITEMS]]
    usage = Usage()
    if judged is not None:
        usage = judged.usage
        scores = [v.score for v in verdicts if v.score is not None]
        metadata.update({"mean_score": round(sum(scores) / len(scores), 3) if scores else None,
                         "scores": [v.score for v in verdicts[:LISTED_SCORES]],
                         "calls": usage.calls, "cache_hits": usage.cache_hits, "prompt_tokens": usage.prompt_tokens,
                         "completion_tokens": usage.completion_tokens, "cost_usd": round(usage.cost_usd, 9)})
    return CheckOutcome(name, check.type, passed, check.severity, check.blocking,
                        describe(task, check, passed, verdicts, ratio), metadata, usage)


def _parameters(check: CheckSpec, task: TaskSpec) -> dict[str, Any]:
    """The check's thresholds and parameters, for its metadata."""
    shown = {"value": check.value, "pattern": check.pattern, "values": check.values, "rubric": check.rubric}
    out: dict[str, Any] = {k: v for k, v in shown.items() if v is not None}
    if check.type == "judge":
        out["min_score"] = check.score_threshold
    if check.type == "json_schema":
        out["schema"] = "check" if check.schema_ is not None else "task output_schema"
    return out


def describe(task: TaskSpec, check: CheckSpec, passed: bool, verdicts: Sequence[Verdict], ratio: float) -> str:
    """One sentence: how many answers passed, and the first failing ones by item with why."""
    total, failing = len(verdicts), [v for v in verdicts if not v.passed]
    if not total:
        return "no answers to check"
    if task.for_each is None:
        head = "passed" if passed else f"failed: {failing[0].reason}" if failing else "failed"
        return head
    share = f"{total - len(failing)} of {total} answers pass ({ratio:.0%}, needs {check.ratio_threshold:.0%})"
    if not failing:
        return share
    shown = "; ".join(f"{v.answer.label(task.name)}: {v.reason}" for v in failing[:5])
    more = f"; … {len(failing) - 5} more" if len(failing) > 5 else ""
    return f"{share}; failing: {shown}{more}"


def evaluate_all(task: TaskSpec, value: Any, judges: Mapping[str, Judged] | None = None,
                 only: set[str] | None = None, indices: Sequence[int] | None = None) -> list[CheckOutcome]:
    """Every check of `task` (those named in `only`, when given) over its stored `value` (entries numbered by
    `indices`, see task_answers); judge checks take their verdicts from `judges` by name."""
    answers, skipped = task_answers(task, value, indices)
    names = check_names(task.checks)
    return [evaluate(task, check, name, answers, skipped, (judges or {}).get(name))
            for check, name in zip(task.checks, names) if only is None or name in only]
