"""`mp-pipelines eval`: run a workflow over labelled examples, one Dagster run per example (tagged `mp/eval_id`),
score each labelled task (accuracy) or judged task (the judge check's mean score), store the result under the
instance's folder, and compare two stored evals (`--compare`). Dataset format and matching rule: `eval_data.py`."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mp_pipelines.cli.args import budget_options, executor_option
from mp_pipelines.cli.eval_data import (
    DatasetError,
    Example,
    compared_answer,
    judge_score,
    matches,
    read_dataset,
    task_names,
)
from mp_pipelines.cli.eval_store import (
    EvalNotFound,
    compare_evals,
    compare_text,
    load_eval,
    new_eval_id,
    save_eval,
    short,
    table,
)

if TYPE_CHECKING:
    from mp_pipelines.spec.models import WorkflowSpec

EVAL_TAG = "mp/eval_id"
EXAMPLE_TAG = "mp/eval_example"
SHOWN_DISAGREEMENTS = 10
EPILOG = ("Exit codes: 0 every run succeeded; 1 a run failed (the eval is still recorded, its examples counted "
          "as disagreements); 2 bad usage (an unknown workflow, task or eval id, a bad dataset row).")


class EvalUsageError(click.ClickException):
    """Bad usage: exit 2 with the reason and no traceback."""

    exit_code = 2


@click.command("eval", epilog=EPILOG)
@click.argument("workflow", required=False)
@click.option("--dataset", metavar="F.jsonl|F.csv",
              help='Labelled examples: JSONL rows {"inputs": {...}, "expected": {task: value}}, or CSV columns '
                   "<input> and expected.<task>.")
@click.option("--task", "tasks", multiple=True, metavar="T", help="Score only task T (repeatable).")
@click.option("--compare", nargs=2, metavar="EVAL_A EVAL_B", default=None,
              help="Print the per-task difference between two stored evals instead of running one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@executor_option
@budget_options
@click.option("--verbose", "-v", is_flag=True, help="Also print Dagster's log on stderr.")
def eval_command(workflow: str | None, dataset: str | None, tasks: tuple[str, ...], compare: tuple[str, str] | None,
                 as_json: bool, executor: str | None, verbose: bool, **budget: Any) -> None:
    """Run WORKFLOW once per labelled example of --dataset and report, per task, the accuracy (or the judge's mean
    score), the examples that disagree, and the calls, tokens and cost; or compare two evals (--compare A B)."""
    if compare:
        if workflow or dataset or tasks:
            raise EvalUsageError("--compare takes two eval ids and nothing else")
        _compare(*compare, as_json=as_json)
        return
    if not workflow or not dataset:
        raise EvalUsageError("give a WORKFLOW and --dataset F.jsonl|F.csv (or --compare EVAL_A EVAL_B)")
    from mp_pipelines.cli.main import _quiet_dagster_logs, refuse_bad_settings, resolve_workflow

    refuse_bad_settings()  # exit 2 naming an MP_* variable that cannot be used, before the dataset is read
    spec, source = resolve_workflow(workflow)
    try:
        examples = read_dataset(dataset, spec)
    except DatasetError as exc:
        raise EvalUsageError(str(exc)) from None
    scored = _scored_tasks(spec, examples, tasks, dataset)
    _quiet_dagster_logs(verbose)
    record = run_eval(spec, source, dataset, examples, scored, executor=executor, budget=budget, verbose=verbose,
                      progress=lambda line: click.echo(line, err=True))
    report = eval_report(record)
    click.echo(json.dumps(report, ensure_ascii=False, default=str, indent=2) if as_json else eval_text(record))
    sys.exit(1 if record["failed_runs"] else 0)


def _compare(id_a: str, id_b: str, *, as_json: bool) -> None:
    from mp_pipelines.cli.running import local_instance

    instance = local_instance()
    try:
        home = instance.root_directory
    finally:
        instance.dispose()
    try:
        diff = compare_evals(load_eval(home, id_a), load_eval(home, id_b))
    except EvalNotFound as exc:
        raise EvalUsageError(str(exc)) from None
    click.echo(json.dumps(diff, ensure_ascii=False, default=str, indent=2) if as_json else compare_text(diff))


def _scored_tasks(spec: WorkflowSpec, examples: list[Example], wanted: tuple[str, ...], dataset: str) -> list[str]:
    """The tasks to score: those the dataset labels and those with a judge check (only `wanted` when given)."""
    from mp_pipelines.spec.problems import suggest

    names = task_names(spec)
    labelled = [name for name in names if any(name in example.expected for example in examples)]
    judged = [task.name for task in spec.all_tasks() if _has_judge(task) and task.name not in labelled]
    for name in wanted:
        if name not in names:
            raise EvalUsageError(f"--task {name}: {spec.name} has no task {name!r}; its tasks: {', '.join(names)}"
                                 f"{suggest(name, names)}")
        if name not in labelled and name not in judged:
            raise EvalUsageError(f"--task {name}: {dataset} gives no expected values for {name!r} and it has no "
                                 f"judge check; labelled tasks: {', '.join(labelled) or 'none'}")
    scored = [name for name in labelled + judged if not wanted or name in wanted]
    if not scored:
        raise EvalUsageError(f"{dataset} gives no expected values (expected: {{task: value}}) and no task of "
                             f"{spec.name} has a judge check: there is nothing to score")
    return scored


def _has_judge(task: Any) -> bool:
    return any(_field(check, "type") == "judge" for check in getattr(task, "checks", None) or [])


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def run_eval(spec: WorkflowSpec, source: str | None, dataset: str, examples: list[Example], scored: list[str], *,
             executor: str | None = None, budget: dict[str, Any] | None = None, verbose: bool = False,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every example (one Dagster run each, tagged with the eval id), score `scored` and store the record."""
    from mp_pipelines.calls.usage import Usage
    from mp_pipelines.cli.running import RunRefused, local_instance, refuse_inputs_outside_roots, run_workflow
    from mp_pipelines.spec.size_limits import SettingError

    say = progress or (lambda _line: None)
    instance = local_instance()
    try:
        home = Path(instance.root_directory)
        eval_id = new_eval_id(spec.name, str(Path(dataset).resolve()))
        say(f"eval {eval_id}: {spec.name} over {len(examples)} example(s) of {dataset}")
        started, usage, checks_usage, runs = time.monotonic(), Usage(), None, []
        prepared = []
        for example in examples:  # every example's file inputs are checked before the first run starts
            inputs = _run_inputs(spec, source, example, Path(dataset).resolve().parent, home / "evals" / "tables")
            try:
                refuse_inputs_outside_roots(spec, inputs, source)
            except RunRefused as exc:
                raise EvalUsageError(f"{dataset}, {example.where}, field 'inputs': {exc}") from None
            prepared.append(inputs)
        for example, inputs in zip(examples, prepared):
            tags = {EVAL_TAG: eval_id, EXAMPLE_TAG: str(example.index)}
            try:
                outcome = run_workflow(spec, inputs, source=source, executor=executor, instance=instance,
                                       budget=budget, verbose=verbose, tags=tags)
            except (RunRefused, SettingError) as exc:
                raise EvalUsageError(f"example {example.index} ({dataset}, {example.where}): {exc}") from None
            usage = usage + outcome.usage
            if getattr(outcome, "checks_usage", None) is not None:  # the quality checks' calls (judges)
                checks_usage = (checks_usage or Usage()) + outcome.checks_usage
            runs.append(outcome)
            say(f"  example {example.index + 1}/{len(examples)}: run {outcome.run_id} {outcome.status}")
        seconds = round(time.monotonic() - started, 2)
    finally:
        instance.dispose()
    record = score(eval_id, spec.name, str(Path(dataset).resolve()), examples, runs, scored)
    record |= {"usage": usage.as_dict(), "seconds": seconds, "source": source}
    if checks_usage is not None:
        record["checks_usage"] = checks_usage.as_dict()
    save_eval(home, record)
    return record


def _run_inputs(spec: WorkflowSpec, source: str | None, example: Example, dataset_dir: Path,
                tables: Path) -> dict[str, Any]:
    """The example's inputs typed for the run: an inline table written to a JSONL file (an allowed input root of
    this eval's runs), a table path relative to the dataset's folder made absolute when the file is there."""
    from mp_pipelines.cli.args import input_problems

    values = dict(example.inputs)
    for name, value in example.inputs.items():
        if spec.inputs[name].type != "table":
            continue
        if isinstance(value, (dict, list)):
            values[name] = str(_write_table(value if isinstance(value, list) else [value], tables, spec, source))
        elif isinstance(value, str) and not Path(value).expanduser().is_absolute() and (dataset_dir / value).exists():
            values[name] = str(dataset_dir / value)
    checked, problems = input_problems(spec, values)
    if problems:  # read_dataset checked them already; a table path may still be refused by the run
        raise EvalUsageError(f"example {example.index} ({example.where}): {'; '.join(problems)}")
    return checked


def _write_table(rows: list[dict[str, Any]], folder: Path, spec: WorkflowSpec, source: str | None) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    _allow_input_folder(folder, spec, source)
    return path


def _allow_input_folder(folder: Path, spec: WorkflowSpec, source: str | None) -> None:
    """Make the folder of inline tables an input root of this process's runs (and their step processes), keeping
    the roots there are; it holds only what this command wrote."""
    from mp_pipelines.cli.running import mark_local_run
    from mp_pipelines.definitions import load_specs
    from mp_pipelines.factory.partitions import inbox_root
    from mp_pipelines.spec.paths import INPUT_ROOTS_ENV, input_roots

    mark_local_run()
    origin = source or load_specs().sources.get(spec.name)
    roots = input_roots(workflow_dir=Path(origin).parent if origin else None, inbox=inbox_root())
    if not roots.contains(folder.resolve()):
        os.environ[INPUT_ROOTS_ENV] = os.pathsep.join([*(str(f) for f in roots.folders), str(folder.resolve())])


def score(eval_id: str, workflow: str, dataset: str, examples: list[Example], runs: list[Any],
          scored: list[str]) -> dict[str, Any]:
    """The eval record: per task accuracy (or mean judge score), n and disagreements; per example its run, its
    answers and verdicts; the runs that failed."""
    labelled = {name for name in scored if any(name in example.expected for example in examples)}
    tasks: dict[str, Any] = {name: {"kind": "accuracy" if name in labelled else "mean_score", "n": 0, "right": 0,
                                    "scores": [], "disagreements": []} for name in scored}
    records, failed = [], []
    for example, outcome in zip(examples, runs):
        entry: dict[str, Any] = {"index": example.index, "where": example.where, "inputs": example.inputs,
                                 "run_id": outcome.run_id, "status": outcome.status, "results": {}}
        error = None if outcome.success else outcome.failure_summary()
        if error:
            failed.append({"example": example.index, "run_id": outcome.run_id, "error": error})
        for name in scored:
            task, summary = tasks[name], outcome.tasks.get(name) or {}
            got = summary.get("output")
            if name in example.expected:
                expected = example.expected[name]
                right = error is None and matches(expected, got)
                got = compared_answer(expected, got)
                task["n"] += 1
                task["right"] += right
                entry["results"][name] = {"expected": expected, "got": got, "match": right}
                if not right:
                    task["disagreements"].append({"example": example.index, "inputs": example.inputs,
                                                  "expected": expected, "got": got, **({"error": error} if error else {})})
            elif name not in labelled:
                mean = judge_score(summary)
                if mean is not None:
                    task["n"] += 1
                    task["scores"].append(mean)
                    entry["results"][name] = {"mean_score": mean, "got": got}
                passed = all(c.get("passed", True) for c in summary.get("checks") or [] if "mean_score" in
                             (c.get("metadata") or {}))
                if mean is None or not passed:
                    task["disagreements"].append({"example": example.index, "inputs": example.inputs, "score": mean,
                                                  "got": got, **({"error": error} if error else {})})
        records.append(entry)
    return {"eval_id": eval_id, "workflow": workflow, "dataset": dataset,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tasks": {name: _task_result(task) for name, task in tasks.items()}, "failed_runs": failed,
            "examples": records}


def _task_result(task: dict[str, Any]) -> dict[str, Any]:
    if task["kind"] == "mean_score":
        scores = task["scores"]
        mean = round(sum(scores) / len(scores), 4) if scores else None
        return {"mean_score": mean, "n": task["n"], "disagreements": task["disagreements"]}
    accuracy = round(task["right"] / task["n"], 4) if task["n"] else None
    return {"accuracy": accuracy, "n": task["n"], "right": task["right"], "disagreements": task["disagreements"]}


def eval_report(record: dict[str, Any]) -> dict[str, Any]:
    """What `eval --json` prints: the record without its per-example details."""
    keys = ("eval_id", "workflow", "dataset", "tasks", "usage", "checks_usage", "failed_runs", "seconds")
    return {key: record[key] for key in keys if key in record}


def eval_text(record: dict[str, Any]) -> str:
    """A short table per task, the usage, then the first disagreements of each task."""
    runs = len(record["examples"])
    lines = [f"eval {record['eval_id']}: {record['workflow']} over {runs} example(s) of {record['dataset']} "
             f"({runs - len(record['failed_runs'])} run(s) succeeded, {record['seconds']} s)"]
    rows = [("task", "metric", "score", "n", "disagree")]
    for name, task in record["tasks"].items():
        metric = "accuracy" if "accuracy" in task else "mean_score"
        value = "-" if task[metric] is None else f"{task[metric]:.3f}"
        rows.append((name, metric, value, str(task["n"]), str(len(task["disagreements"]))))
    lines += table(rows)
    usage = record["usage"]
    lines.append(f"usage: {usage.get('calls', 0)} call(s), {usage.get('cache_hits', 0)} cache hit(s), "
                 f"{usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} tokens, "
                 f"${usage.get('cost_usd', 0.0):.4f}")
    if record.get("checks_usage"):
        judges = record["checks_usage"]
        lines.append(f"checks usage (judges): {judges.get('calls', 0)} call(s), {judges.get('cache_hits', 0)} cache "
                     f"hit(s), ${judges.get('cost_usd', 0.0):.4f}")
    for name, task in record["tasks"].items():
        for item in task["disagreements"][:SHOWN_DISAGREEMENTS]:
            wanted = f"expected {short(item['expected'])}" if "expected" in item else f"score {item.get('score')}"
            got = f"error: {item['error'][:120]}" if item.get("error") else f"got {short(_labelled_part(item))}"
            lines.append(f"  {name} example {item['example']}: {wanted}; {got}")
        hidden = len(task["disagreements"]) - SHOWN_DISAGREEMENTS
        if hidden > 0:
            lines.append(f"  {name}: {hidden} more disagreement(s) (see --json)")
    lines.append(f"recorded as {record['eval_id']}: compare with `mp-pipelines eval --compare {record['eval_id']} "
                 "EVAL_B`")
    return "\n".join(lines)


def _labelled_part(item: dict[str, Any]) -> Any:
    """What a disagreement shows of an answer: the keys its label gives, when both are objects."""
    expected, got = item.get("expected"), item.get("got")
    if isinstance(expected, dict) and isinstance(got, dict):
        return {key: got.get(key) for key in expected}
    return got
