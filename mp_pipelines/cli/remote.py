"""Remote operations over a running Dagster webserver's GraphQL API: launch, status, cancel, reload.

They use dagster-graphql's `DagsterGraphQLClient` (docs/api.md maps REST-style calls onto them).
Errors are one sentence naming the URL or run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click

from mp_pipelines.cli.args import executor_option, input_options, parse_pairs, parse_remote_inputs

if TYPE_CHECKING:
    from dagster_graphql import DagsterGraphQLClient

URL_ENV = "MP_DAGSTER_URL"
DEFAULT_URL = "http://127.0.0.1:3000"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
_REQUEST_TIMEOUT = 30  # seconds per GraphQL request


class RemoteError(click.ClickException):
    """A remote operation failed; the message says what and where."""


@dataclass(frozen=True)
class Endpoint:
    """Where a webserver's GraphQL API is: host, port, https and path prefix from a URL."""

    url: str
    hostname: str
    port: int | None
    use_https: bool
    path_prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """The endpoint of `url` (`host:port` means http); RemoteError when it is not an http(s) URL."""
        text = url.strip().rstrip("/")
        parts = urlsplit(text if "://" in text else f"http://{text}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:3000")
        try:
            port = parts.port
        except ValueError:
            raise RemoteError(f"--url {url!r} has an invalid port") from None
        prefix = parts.path.rstrip("/")
        prefix = prefix.removesuffix("/graphql")
        return cls(f"{parts.scheme}://{parts.netloc}{prefix}", parts.hostname, port, parts.scheme == "https", prefix)


def client_for(url: str) -> DagsterGraphQLClient:
    """A DagsterGraphQLClient for the webserver at `url`."""
    from dagster_graphql import DagsterGraphQLClient

    endpoint = Endpoint.parse(url)
    return DagsterGraphQLClient(endpoint.hostname, port_number=endpoint.port, use_https=endpoint.use_https,
                                timeout=_REQUEST_TIMEOUT, path_prefix=endpoint.path_prefix)


def _explain(exc: Exception, url: str, run_id: str | None = None, job: str | None = None) -> RemoteError:
    """One clear sentence for a DagsterGraphQLClientError (or anything the client raised)."""
    import requests

    causes = []
    link: BaseException | None = exc
    while link is not None and len(causes) < 10:
        causes.append(link)
        link = link.__cause__ or link.__context__
    kind = exc.args[0] if exc.args else ""
    detail = exc.args[1] if len(exc.args) > 1 else ""
    if any(isinstance(c, requests.exceptions.Timeout) for c in causes):
        return RemoteError(f"the Dagster webserver at {url} did not answer within {_REQUEST_TIMEOUT} s")
    if any(isinstance(c, requests.exceptions.ConnectionError) for c in causes) or "Error when connecting" in str(kind):
        refused = next((c for c in causes if isinstance(c, ConnectionRefusedError)), None)
        reason = "connection refused" if refused else "connection failed"
        return RemoteError(f"cannot reach the Dagster webserver at {url}: {reason}; "
                           "is `dagster-webserver` running there (check --url or MP_DAGSTER_URL)?")
    if kind in ("RunNotFoundError", "PipelineRunNotFoundError") or (run_id and "not found" in str(detail).lower()):
        return RemoteError(f"no run with id {run_id!r} on {url}")
    if kind in ("JobNotFoundError", "PipelineNotFoundError"):
        return RemoteError(f"no workflow job named {job!r} on {url}; add its file to MP_WORKFLOWS_PATH there "
                           "and run `mp-pipelines reload`")
    if kind == "TerminateRunFailure":
        return RemoteError(f"run {run_id} cannot be cancelled: {detail}")
    if kind in ("RunConfigValidationInvalid", "PipelineConfigValidationInvalid"):
        messages = [e.get("message", str(e)) if isinstance(e, dict) else str(e) for e in (detail or [])]
        return RemoteError("the webserver rejected the run config: " + "; ".join(messages))
    if "Server error" in str(kind) or "Exception occured" in str(kind):
        return RemoteError(f"the webserver at {url} failed to answer the request ({str(kind).splitlines()[0]}); "
                           "is this the Dagster webserver's URL?")
    text = f"{kind}: {detail}" if detail else str(kind or exc)
    return RemoteError(f"request to {url} failed: {text}")


def _call(url: str, action: str, **kwargs: Any) -> Any:
    """`action` of the GraphQL client with `kwargs`; its errors become one RemoteError sentence."""
    from dagster_graphql import DagsterGraphQLClientError

    client = client_for(url)
    try:
        return getattr(client, action)(**kwargs)
    except DagsterGraphQLClientError as exc:
        raise _explain(exc, Endpoint.parse(url).url, kwargs.get("run_id"), kwargs.get("job_name")) from None


def launch_run(url: str, workflow: str, inputs: dict[str, Any], *, tags: dict[str, str] | None = None,
               executor: str | None = None) -> str:
    """Submit a run of `workflow` (its job) with `inputs`; returns the run id."""
    from mp_pipelines.cli.config import run_config

    # The server's own console log level applies: only the local CLI quiets Dagster's console logger.
    config = run_config(inputs, executor, console_log_level=None)
    return _call(url, "submit_job_execution", job_name=workflow, run_config=config, tags=tags or None)


def run_status(url: str, run_id: str) -> str:
    """The run's status name (QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, …)."""
    return _call(url, "get_run_status", run_id=run_id).value


def cancel_run(url: str, run_id: str) -> None:
    """Terminate a queued or running run."""
    _call(url, "terminate_run", run_id=run_id)


def wait_for_run(url: str, run_id: str, timeout: float, poll: float = 1.0) -> str:
    """Poll until the run finishes; its final status. RemoteError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(url, run_id)
        if status in FINISHED:
            return status
        if time.monotonic() >= deadline:
            raise RemoteError(f"run {run_id} is still {status} after {timeout:g} s")
        time.sleep(poll)


def location_names(url: str) -> list[str]:
    """The code locations the webserver serves."""
    import requests

    endpoint = Endpoint.parse(url)
    try:
        response = requests.post(f"{endpoint.url}/graphql", timeout=_REQUEST_TIMEOUT, json={
            "query": "{ workspaceOrError { __typename ... on Workspace { locationEntries { name } } } }"})
        response.raise_for_status()
        entries = response.json()["data"]["workspaceOrError"]["locationEntries"]
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _explain(exc, endpoint.url) from None
    except (requests.exceptions.RequestException, KeyError, TypeError, ValueError) as exc:
        raise RemoteError(f"could not list the code locations of {endpoint.url}: {exc}") from None
    return [entry["name"] for entry in entries]


def reload_location(url: str, location: str | None = None) -> str:
    """Reload a code location (default: the only one) so new or removed workflow files show; its name."""
    if location is None:
        names = location_names(url)
        if len(names) != 1:
            raise RemoteError(f"{url} serves {len(names)} code locations ({', '.join(names) or 'none'}); "
                              "name one with --location")
        location = names[0]
    info = _call(url, "reload_repository_location", repository_location_name=location)
    if info.status.value != "SUCCESS":
        raise RemoteError(f"reloading code location {location!r} on {url} failed: "
                          f"{info.failure_type or ''} {info.message or ''}".strip())
    return location


_url_option = click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True,
                           help=f"The Dagster webserver (or set {URL_ENV}).")


@click.command("launch")
@click.argument("workflow")
@_url_option
@input_options
@click.option("--tag", "tag_pairs", multiple=True, metavar="KEY=VALUE", help="A run tag; repeatable.")
@executor_option
@click.option("--wait", "wait_seconds", type=float, default=None, metavar="SECONDS",
              help="Wait up to SECONDS for the run to finish; exit 1 unless it succeeds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: run_id, status, url.")
def launch_command(workflow: str, url: str, pairs: tuple[str, ...], input_file: str | None,
                   tag_pairs: tuple[str, ...], executor: str | None, wait_seconds: float | None, as_json: bool) -> None:
    """Launch WORKFLOW on a running Dagster webserver (queued for the daemon) and print the run id."""
    inputs = parse_remote_inputs(workflow, pairs, input_file)
    tags = parse_pairs(tag_pairs, "--tag")
    run_id = launch_run(url, workflow, inputs, tags=tags, executor=executor)
    status = wait_for_run(url, run_id, wait_seconds) if wait_seconds is not None else run_status(url, run_id)
    run_url = f"{Endpoint.parse(url).url}/runs/{run_id}"
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "status": status, "url": run_url}))
    else:
        click.echo(f"run {run_id}: {status}\n{run_url}")
    if wait_seconds is not None and status != "SUCCESS":
        raise SystemExit(1)


@click.command("status")
@click.argument("run_id")
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: run_id, status.")
def status_command(run_id: str, url: str, as_json: bool) -> None:
    """Print the status of run RUN_ID on a Dagster webserver."""
    value = run_status(url, run_id)
    click.echo(json.dumps({"run_id": run_id, "status": value}) if as_json else f"run {run_id}: {value}")


@click.command("cancel")
@click.argument("run_id")
@_url_option
def cancel_command(run_id: str, url: str) -> None:
    """Cancel (terminate) queued or running run RUN_ID on a Dagster webserver."""
    cancel_run(url, run_id)
    click.echo(f"run {run_id}: cancel requested ({run_status(url, run_id)})")


@click.command("reload")
@_url_option
@click.option("--location", default=None, help="Code location to reload (default: the only one).")
def reload_command(url: str, location: str | None) -> None:
    """Reload the webserver's code location so added, changed or removed workflow files show."""
    name = reload_location(url, location)
    click.echo(f"reloaded code location {name} on {Endpoint.parse(url).url}")


COMMANDS = (launch_command, status_command, cancel_command, reload_command)
