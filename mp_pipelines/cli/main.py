"""`mp-pipelines`: list, validate, show and run workflows from the command line."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mp_pipelines.cli.args import budget_options, executor_option, input_options, mode_option, parse_inputs
from mp_pipelines.spec.loader import LoadResult, WorkflowValidationError, load_workflow_file, load_workflows
from mp_pipelines.spec.models import WorkflowSpec
from mp_pipelines.spec.size_limits import SettingError

if TYPE_CHECKING:
    from mp_pipelines.calls.store import ResponseStore
    from mp_pipelines.cli.running import RunOutcome


EXIT_CODES = ("Exit codes: 0 success; 1 a run failed (run, resume) or a workflow has problems (validate); "
              "2 bad usage or input (an unknown workflow, an unknown or mistyped input, an unreadable input file, "
              "a run that cannot be resumed, a run refused before it started, an MP_* setting that cannot be used).")


class RunRefusedError(click.ClickException):
    """A run refused before it started: exit 2, as for bad arguments, with the reason and no traceback."""

    exit_code = 2


class BadUsageError(click.ClickException):
    """Bad usage or input, such as an unknown workflow: exit 2 with the reason and no traceback."""

    exit_code = 2


def _echo_err(message: str) -> None:
    """Progress and warnings go to stderr, leaving stdout to results."""
    click.echo(message, err=True)


def _load(paths: tuple[str, ...] = ()) -> LoadResult:
    """The workflows of `paths`, or of every workflow folder when none are given."""
    return load_workflows([Path(p) for p in paths] if paths else None)


def resolve_workflow(name_or_path: str, load: Callable[[], LoadResult] = _load) -> tuple[WorkflowSpec, str | None]:
    """A workflow by name (from the workflow folders, read by `load`) or by YAML path; BadUsageError (exit 2) when
    not found or invalid."""
    from mp_pipelines.spec.problems import suggest

    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        try:
            return load_workflow_file(name_or_path), str(Path(name_or_path).resolve())
        except WorkflowValidationError as exc:
            raise BadUsageError(str(exc)) from None
    loaded = load()
    if name_or_path in loaded.specs:
        return loaded.specs[name_or_path], None
    bad = [p for p in loaded.problems if name_or_path in str(p.file or "")]
    if bad:
        raise BadUsageError("\n".join(str(p) for p in bad))
    known = ", ".join(sorted(loaded.specs)) or "none"
    raise BadUsageError(f"no workflow named {name_or_path!r}; known workflows: {known}"
                        f"{suggest(name_or_path, loaded.specs)} (or give the path of a YAML file)")


class LazyGroup(click.Group):
    """A command group whose commands in `lazy` (name → "module:attribute") are imported only when they run or
    `--help` lists them, so `list`, `validate` and `show` do not import what the other commands need (click's
    lazily loaded subcommands)."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attribute = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


LAZY_COMMANDS = {
    # runs on a Dagster webserver over GraphQL (cli/remote.py)
    "launch": "mp_pipelines.cli.remote:launch_command", "status": "mp_pipelines.cli.remote:status_command",
    "cancel": "mp_pipelines.cli.remote:cancel_command", "reload": "mp_pipelines.cli.remote:reload_command",
    "ui": "mp_pipelines.cli.ui:ui",
    "stats": "mp_pipelines.cli.stats:stats_command",  # usage over time from the instance's database
    "eval": "mp_pipelines.cli.eval:eval_command",  # labelled examples, accuracy and comparisons
    "new": "mp_pipelines.cli.new:new_command",  # a workflow from a template
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, epilog=EXIT_CODES)
@click.version_option(package_name="mp-pipelines")
def main() -> None:
    """Multi-step LLM prompt workflows that run as Dagster jobs."""


@main.command("list")
def list_command() -> None:
    """List the workflows found in the shipped folder and MP_WORKFLOWS_PATH."""
    loaded = _load()
    width = max((len(n) for n in loaded.specs), default=10)
    for name, spec in sorted(loaded.specs.items()):
        inputs = ", ".join(spec.inputs) or "-"
        click.echo(f"{name:<{width}}  {len(spec.all_tasks()):>2} tasks  inputs: {inputs}  {spec.description}")
    for problem in loaded.problems:
        _echo_err(f"warning: {problem}")
    if loaded.problems:
        _echo_err(f"{len(loaded.problems)} problem(s); run `mp-pipelines validate` for details")


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
def validate(paths: tuple[str, ...]) -> None:
    """Check workflow files (default: every workflow folder); exit 1 if any has a problem."""
    loaded = _load(paths)
    for name, spec in sorted(loaded.specs.items()):
        click.echo(f"ok    {name} ({loaded.sources.get(name, '?')}): {len(spec.all_tasks())} tasks")
    for problem in loaded.problems:
        click.echo(f"error {problem}")
    for note in loaded.notes:
        click.echo(f"note  {note}")
    click.echo(f"{len(loaded.specs)} workflow(s) valid, {len(loaded.problems)} problem(s)")
    if loaded.problems or not loaded.specs:
        sys.exit(1)


@main.command()
@click.argument("workflow")
def show(workflow: str) -> None:
    """Print a workflow's DAG: inputs, steps in run order and what each depends on."""
    from mp_pipelines.cli.show import render_workflow

    spec, _ = resolve_workflow(workflow)
    click.echo(render_workflow(spec))


verbose_option = click.option("--verbose", "-v", is_flag=True,
                              help="Also print Dagster's log on stderr, with the stack trace of a failed step.")


@main.command(epilog=EXIT_CODES)
@click.argument("workflow")
@input_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")
@executor_option
@mode_option
@budget_options
@verbose_option
def run(workflow: str, pairs: tuple[str, ...], input_file: str | None, as_json: bool, executor: str | None,
        mode: str | None, verbose: bool, **budget: Any) -> None:
    """Run WORKFLOW (a name or a YAML path) through Dagster and print each task's result."""
    from mp_pipelines.cli.running import RunRefused, run_workflow
    from mp_pipelines.definitions import load_specs

    _quiet_dagster_logs(verbose)
    refuse_bad_settings()
    spec, source = resolve_workflow(workflow, load_specs)  # the load the run's job is then built from (cached)
    inputs = parse_inputs(spec, pairs, input_file)
    try:
        outcome = run_workflow(spec, inputs, source=source, executor=executor, progress=_echo_err, budget=budget,
                               verbose=verbose, mode=mode)
    except (RunRefused, SettingError) as exc:
        raise RunRefusedError(str(exc)) from None
    _print_outcome(outcome, as_json)


def refuse_bad_settings() -> None:
    """RunRefusedError (exit 2) naming the first MP_* variable a run reads whose value cannot be used."""
    from mp_pipelines.cli.settings_check import check_settings

    try:
        check_settings()
    except SettingError as exc:
        raise RunRefusedError(str(exc)) from None


@main.command()
@click.option("--name", "-n", default=None, help="Worker name (default: mp-<random>); @<host> is appended.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Steps this worker runs at once, each in its own process (default: the number of CPUs).")
@click.option("--loglevel", "-l", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
def worker(name: str | None, concurrency: int | None, loglevel: str) -> None:
    """Start a Celery worker that runs the steps of `--executor celery` runs (broker: MP_CELERY_BROKER).

    It needs the runs' environment: DAGSTER_HOME (the same instance), the workflow files, MP_STEP_STORAGE_DIR
    (a folder every worker mounts at the same path) and the model's endpoint and key."""
    import uuid

    from mp_pipelines.dagster_ext.celery import QUEUE, CeleryNotConfigured, make_worker_app

    try:
        app = make_worker_app()
    except CeleryNotConfigured as exc:
        raise RunRefusedError(str(exc)) from None
    argv = ["worker", "--queues", QUEUE, "--loglevel", loglevel.upper(),
            "--hostname", f"{name or 'mp-' + uuid.uuid4().hex[:6]}@%h"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)


@main.command(epilog=EXIT_CODES)
@click.argument("run_id")
@click.option("--force", is_flag=True, help="Resume a run still marked started whose process is gone (killed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")
@budget_options
@verbose_option
def resume(run_id: str, force: bool, as_json: bool, verbose: bool, **budget: Any) -> None:
    """Re-execute failed run RUN_ID from failure: only what failed runs again, and answers it got are not paid twice."""
    from mp_pipelines.cli.running import ResumeError, RunRefused, resume_run

    _quiet_dagster_logs(verbose)
    refuse_bad_settings()
    try:
        outcome = resume_run(run_id, force=force, budget=budget, progress=_echo_err, verbose=verbose)
    except ResumeError as exc:  # no such run, or one that cannot be resumed: bad usage
        raise BadUsageError(str(exc)) from None
    except (RunRefused, SettingError) as exc:
        raise RunRefusedError(str(exc)) from None
    _print_outcome(outcome, as_json)


def _quiet_dagster_logs(verbose: bool = False) -> None:
    """Keep Dagster's engine logger to warnings with --verbose, else to critical errors only."""
    import logging

    # Dagster's own engine logger prints every step event, and a failed step's stack trace; the CLI prints its
    # own progress and a one-paragraph failure summary instead.
    logging.getLogger("dagster").setLevel(logging.WARNING if verbose else logging.CRITICAL)


def _print_outcome(outcome: RunOutcome, as_json: bool) -> None:
    """Print a finished run (JSON or text), and the failure summary on stderr; exit 0 only if it succeeded."""
    if as_json:
        click.echo(json.dumps(outcome.as_json(), ensure_ascii=False, default=str, indent=2))
    else:
        click.echo(outcome.as_text())
    if not outcome.success:
        _echo_err("")
        _echo_err(outcome.failure_summary())
    sys.exit(0 if outcome.success else 1)


@main.group()
def cache() -> None:
    """Inspect or clear the LLM response cache (and run checkpoints) of the local Dagster instance."""


def _store() -> ResponseStore:
    """The response cache of the local instance; ClickException when the instance has none."""
    from mp_pipelines.calls.store import store_for
    from mp_pipelines.cli.running import local_instance

    instance = local_instance()
    try:
        store = store_for(instance)
    finally:
        instance.dispose()
    if store is None:
        raise click.ClickException("the Dagster instance is ephemeral: there is no response cache to use")
    return store


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def cache_stats(as_json: bool) -> None:
    """Entries, hits and dollars saved, per workflow."""
    stats = _store().stats()
    if as_json:
        click.echo(json.dumps(stats, default=str, indent=2))
        return
    click.echo(f"cache: {stats['url']}")
    for group in stats["groups"]:
        click.echo(f"  {group['workflow']:<24} {group['kind']:<10} {group['entries']:>7} entries "
                   f"{group['hits']:>7} hits  ${group['saved_usd']:.4f} saved")
    click.echo(f"total: {stats['entries']} entries, {stats['hits']} hits, ${stats['saved_usd']:.4f} saved")


@cache.command("clear")
@click.option("--workflow", help="Only entries written by this workflow.")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Only entries written more than DAYS days ago.")
def cache_clear(workflow: str | None, older_than: float | None) -> None:
    """Delete cached answers (all of them, one workflow's, or old ones)."""
    removed = _store().clear(workflow=workflow, older_than_days=older_than)
    click.echo(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")


@main.command("serve-model")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--latency", default=0.0, show_default=True, type=float, help="Seconds per answer.")
@click.option("--failure-rate", default=0.0, show_default=True, type=float, help="Share of 500/429 answers.")
def serve_model(host: str, port: int, latency: float, failure_rate: float) -> None:
    """Serve the simulated model as an OpenAI-compatible HTTP endpoint (for OPENAI_BASE_URL)."""
    from mp_pipelines.llm.serve import serve

    _echo_err(f"simulated OpenAI-compatible endpoint on http://{host}:{port}/v1 (Ctrl-C to stop)")
    serve(host, port, latency, failure_rate)


if __name__ == "__main__":
    main()
