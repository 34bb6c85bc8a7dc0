"""`mp-pipelines new NAME --template T`: write a runnable, commented workflow (and its sample data) from a template.

Templates live in `mp_pipelines/workflows/templates/<template>/`: `workflow.yaml` and any files under `data/`.
`__workflow__` in their text and paths becomes the new workflow's name. The file goes into `--dir`, else the
first folder of MP_WORKFLOWS_PATH, else `./workflows`, and is validated before the command returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from mp_pipelines.spec.loader import PATH_ENV, SHIPPED_WORKFLOWS_DIR, load_workflow_file, load_workflows
from mp_pipelines.spec.models import check_name
from mp_pipelines.spec.problems import WorkflowValidationError, suggest

TEMPLATES_DIR = SHIPPED_WORKFLOWS_DIR / "templates"
PLACEHOLDER = "__workflow__"
DEFAULT_DIR = Path("workflows")
# One line each for `new --list`, in the order shown.
TEMPLATES = {
    "map_reduce": "summarize each document of a folder (map), then combine the summaries (reduce); sample documents",
    "classify": "label each row of a CSV with a JSON answer checked by a schema, then summarize; sample CSV",
    "plan_research_reflect": "plan questions, research them in parallel, draft, then critique and revise in a loop",
    "extract_table": "extract fields from each document into a table (one JSON row per document); sample invoices",
}


class NewRefused(click.ClickException):
    """Bad name, unknown template or a file already there: exit 2 with the reason."""

    exit_code = 2


@dataclass(frozen=True)
class Written:
    """What `new` wrote: the workflow file and its sample data files."""

    workflow: Path
    data: list[Path]


def target_dir(given: str | None) -> Path:
    """Where a new workflow goes: `given`, else the first folder of MP_WORKFLOWS_PATH, else ./workflows."""
    if given:
        return Path(given)
    first = next((entry for entry in os.environ.get(PATH_ENV, "").split(os.pathsep) if entry.strip()), None)
    return Path(first) if first else DEFAULT_DIR


def template_files(template: str) -> dict[Path, str]:
    """A template's files: path relative to the target folder (placeholder not yet replaced) → text."""
    root = TEMPLATES_DIR / template
    files = {Path("__workflow__.yaml"): (root / "workflow.yaml").read_text(encoding="utf-8")}
    for path in sorted((root / "data").rglob("*")) if (root / "data").is_dir() else []:
        if path.is_file():
            files[path.relative_to(root)] = path.read_text(encoding="utf-8")
    return files


def write_workflow(name: str, template: str, folder: Path, *, force: bool = False) -> Written:
    """Write workflow `name` from `template` into `folder`; NewRefused for a bad name or template, or when a file
    it would write exists (unless `force`). The written workflow is not validated here (see `new`)."""
    try:
        check_name(name, "workflow")
    except ValueError as exc:
        raise NewRefused(str(exc)) from None
    if template not in TEMPLATES:
        raise NewRefused(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}{suggest(template, TEMPLATES)}")
    planned = {folder / Path(str(rel).replace(PLACEHOLDER, name)): text.replace(PLACEHOLDER, name)
               for rel, text in template_files(template).items()}
    existing = [str(path) for path in planned if path.exists()]
    if existing and not force:
        raise NewRefused(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                         "choose another name or --dir, or pass --force to overwrite")
    for path, text in planned.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    workflow, *data = planned
    return Written(workflow, data)


def _in_workflow_path(folder: Path) -> bool:
    entries = [Path(e).resolve() for e in os.environ.get(PATH_ENV, "").split(os.pathsep) if e.strip()]
    return folder.resolve() in entries


@click.command("new")
@click.argument("name", required=False)
@click.option("--template", "-t", type=click.Choice(list(TEMPLATES)), help="The kind of workflow to start from.")
@click.option("--dir", "folder", type=click.Path(file_okay=False),
              help=f"Folder to write into (default: the first folder of {PATH_ENV}, else ./workflows).")
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@click.option("--list", "list_templates", is_flag=True, help="List the templates and exit.")
def new_command(name: str | None, template: str | None, folder: str | None, force: bool, list_templates: bool) -> None:
    """Write a runnable, commented workflow NAME (and sample data) from a template, and validate it."""
    if list_templates:
        width = max(map(len, TEMPLATES))
        for key, line in TEMPLATES.items():
            click.echo(f"{key:<{width}}  {line}")
        return
    if not name:
        raise NewRefused("give the new workflow's NAME (see `mp-pipelines new --list` for the templates)")
    if not template:
        raise NewRefused(f"give --template, one of: {', '.join(TEMPLATES)}")
    target = target_dir(folder)
    taken = load_workflows().sources.get(name)
    if taken is not None and taken.resolve() != (target / f"{name}.yaml").resolve():
        raise NewRefused(f"a workflow named {name!r} already exists ({taken}); workflow names must be unique, "
                         "so choose another name")
    written = write_workflow(name, template, target, force=force)
    try:
        spec = load_workflow_file(written.workflow)
    except WorkflowValidationError as exc:  # a broken template is a bug; say so rather than leave a silent bad file
        raise click.ClickException(f"the written workflow does not validate (a bug in template {template!r}):\n{exc}")
    click.echo(f"wrote {written.workflow} ({len(spec.all_tasks())} tasks, template {template})")
    for path in written.data:
        click.echo(f"wrote {path} (sample data)")
    how = name if _in_workflow_path(target) else str(written.workflow)
    click.echo(f"next: mp-pipelines run {how}")
