"""The one-paragraph summary `mp-pipelines run` and `resume` print when a run fails: which task, which item, why,
and what to do next. Pure functions over a run's task summaries (no Dagster), so they are quick to test."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_ITEM = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\[(\d+)(?:_\d+)?\]")
# A SettingError no op turned into its own failure message shows as Dagster prints it: its qualified class name.
_SETTING_CLASS = re.compile(r"\b(?:[A-Za-z_][\w.]*\.)?(?:SettingError|SettingsError|PriceSettingError): ")
# What to do, by words of the error: the first match wins.
_ADVICE: Sequence[tuple[tuple[str, ...], str]] = (
    (("budget of run",), ""),  # the budget error says where its limit was set and how to raise it
    # an MP_* variable the step read cannot be used (SettingError): neither the workflow nor its input is at fault
    (("environment setting:",), "fix or unset the environment variable named above where the run's steps run (the "
     "code location's or worker's environment), then run it again"),
    (("tls certificate",), "set SSL_CERT_FILE to the authority that signed the endpoint's certificate (or fix the "
     "certificate), then resume the run"),
    (("401", "403", "authentication", "api key", "permission"),
     "check OPENAI_API_KEY (and OPENAI_BASE_URL) for the endpoint, then resume the run"),
    (("connection", "connect", "timed out", "timeout", "429", "rate limit", "502", "503", "500", "unreachable"),
     "the endpoint failed or was too slow; check OPENAI_BASE_URL or raise the task's timeout/retries, then resume "
     "the run"),
    (("template", "undefined", "jinja", "has no attribute", "rendered prompt"),
     "fix the task's template (run `mp-pipelines validate` on the workflow), then run it again"),
    (("json", "schema", "invalid_output", "invalid output"),
     "the answer did not match the task's output_schema; loosen the schema or raise repair_attempts, then resume "
     "the run"),
    (("no such file", "does not exist", "not found", "cannot be read", "cannot read"),
     "check the path given for the input, then run again"),
)


def _advice(reason: str, run_id: str) -> str:
    low = reason.lower()
    resume = f"`mp-pipelines resume {run_id}` re-runs only what failed"
    for words, advice in _ADVICE:
        if any(word in low for word in words):
            return f"To continue: {advice}; {resume}." if advice else f"{resume} (with the larger limit)."
    return f"To continue: fix the cause above, then {resume}."


def failed_item(task: Mapping[str, Any], name: str) -> str | None:
    """The first failed item of a fan-out task, as `research[1] ("What is…")`, when the summary knows it."""
    for item in task.get("failed_items") or []:
        shown = str(item.get("item", ""))
        shown = shown if len(shown) <= 60 else shown[:57] + "…"
        return f"{name}[{item.get('index')}]" + (f" ({shown!r})" if shown else "")
    match = _ITEM.search(str(task.get("error") or ""))
    return match.group(0) if match and match.group(1) == name else None


def failure_summary(run_id: str, tasks: Mapping[str, Mapping[str, Any]], order: Sequence[str],
                    step_errors: Sequence[str] = ()) -> str:
    """One paragraph: the first failed task (in run order), its item, the reason, what to do; stack traces are
    in the Dagster UI and with --verbose. `step_errors` are those of failed steps of no task (the inputs step),
    said when no task failed."""
    failed = [name for name in order if tasks.get(name, {}).get("status") == "failed"]
    failed += [name for name, task in tasks.items() if task.get("status") == "failed" and name not in failed]
    checked = [name for name, task in tasks.items() if task.get("checks_error")]
    if not failed and checked:
        name = checked[0]
        reason = " ".join(str(tasks[name]["checks_error"]).split()).removeprefix(f"task {name}: ")
        advice = ("To continue: improve the task's prompt, or loosen the check (severity: warn, or blocking: false), "
                  "then run it again." if "blocking check" in reason else _advice(reason, run_id))
        return f"Run {run_id} failed at the quality checks of task {name}: {reason}. {advice}"
    if not failed and step_errors:
        reason = _SETTING_CLASS.sub("environment setting: ", " ".join(step_errors[0].split()).removesuffix("."))
        return f"Run {run_id} failed before any task ran, at {reason}. {_advice(reason, run_id)}"
    if not failed:
        return (f"Run {run_id} failed before any task did (see the Dagster UI, or run again with --verbose for "
                "Dagster's log).")
    name = failed[0]
    task = tasks[name]
    reason = " ".join(str(task.get("error") or "no error was recorded").split())
    reason = _SETTING_CLASS.sub("environment setting: ", reason.removeprefix(f"task {name}: ").removesuffix("."))
    item = failed_item(task, name)
    where = f"task {name}" + (f", item {item}" if item else "")
    others = f" ({len(failed) - 1} other task(s) failed too)" if len(failed) > 1 else ""
    return (f"Run {run_id} failed at {where}{others}: {reason}. {_advice(reason, run_id)} "
            "Stack traces: the Dagster UI (mp-pipelines ui), or --verbose.")
