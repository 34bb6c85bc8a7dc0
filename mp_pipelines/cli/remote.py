"""Remote operations over a running Dagster webserver's GraphQL API: launch, status, cancel, reload.

They use dagster-graphql's `DagsterGraphQLClient` (docs/api.md maps REST-style calls onto them) over a transport
of this module that gives each command one overall deadline (`--timeout`): a timeout per read would let a
webserver that trickles its answer keep a command waiting for ever. HTTP Basic auth for a proxy in front of the
webserver (deploy/nginx): `user:password@` in `--url`, else MP_DAGSTER_USER / MP_DAGSTER_PASSWORD; neither the
password nor the user:password part of a URL is ever shown. Errors are one sentence naming the URL or run.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click

from mp_pipelines.cli.args import executor_option, input_options, mode_option, parse_pairs, parse_remote_inputs
from mp_pipelines.llm.redact import redact, split_credentials

if TYPE_CHECKING:
    from gql.transport import Transport

URL_ENV = "MP_DAGSTER_URL"
USER_ENV = "MP_DAGSTER_USER"
PASSWORD_ENV = "MP_DAGSTER_PASSWORD"
DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_TIMEOUT = 60.0  # seconds one command may spend on the webserver's answers (with --wait: on top of it)
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


class RemoteError(click.ClickException):
    """A remote operation failed; the message says what and where."""


class DeadlinePassed(Exception):
    """The command's deadline passed before the webserver had answered."""


class AccessRefused(Exception):
    """The webserver (its proxy) answered 401 or 403; `reason` is the proxy's own message, when it gave one."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status, self.reason = status, reason


def refusal_of(status: int, body: bytes) -> AccessRefused | None:
    """AccessRefused for a 401 or 403 answer (with the first GraphQL error message of its body), else None."""
    if status not in (401, 403):
        return None
    try:
        reason = str(json.loads(body)["errors"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        reason = ""
    return AccessRefused(status, redact(reason[:300]))


def env_credentials() -> tuple[str, str] | None:
    """(user, password) from MP_DAGSTER_USER and MP_DAGSTER_PASSWORD; RemoteError when only one is set."""
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV)
    if not user and password is None:
        return None
    if not user or password is None:
        missing = USER_ENV if not user else PASSWORD_ENV
        raise RemoteError(f"{missing} is not set; set both {USER_ENV} and {PASSWORD_ENV} (or neither)")
    return user, password


@dataclass(frozen=True)
class Endpoint:
    """Where a webserver's GraphQL API is: host, port, https and path prefix from a URL."""

    url: str  # without user:password: the form every message shows
    hostname: str
    port: int | None
    use_https: bool
    path_prefix: str
    credentials: tuple[str, str] | None = field(default=None, repr=False)  # (user, password) for HTTP Basic auth

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """The endpoint of `url` (`host:port` means http); RemoteError when it is not an http(s) URL."""
        text = url.strip().rstrip("/")
        text = text if "://" in text else f"http://{text}"
        shown = redact(text)  # no user:password, even in a URL too broken to split
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise RemoteError(f"--url {shown!r} has an invalid port or host") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"--url {shown!r} is not an http(s) URL such as http://127.0.0.1:3000")
        prefix = parts.path.rstrip("/").removesuffix("/graphql")
        split = split_credentials(f"{parts.scheme}://{parts.netloc}{prefix}")
        credentials = (split.username, split.password) if split.present else env_credentials()
        return cls(split.public_url, parts.hostname, port, parts.scheme == "https", prefix, credentials)


@dataclass(frozen=True)
class Deadline:
    """When one command must be done with the webserver."""

    seconds: float
    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()


def post_json(endpoint: Endpoint, payload: dict[str, Any], deadline: Deadline) -> tuple[int, bytes]:
    """POST `payload` to the endpoint's /graphql: (status, body). DeadlinePassed once the deadline passes, however
    slowly the answer comes (the request is cancelled, which closes its connection); httpx errors otherwise."""
    import httpx

    remaining = deadline.remaining()
    if remaining <= 0:
        raise DeadlinePassed
    auth = httpx.BasicAuth(*endpoint.credentials) if endpoint.credentials else None

    async def send() -> tuple[int, bytes]:
        async with httpx.AsyncClient(auth=auth, timeout=remaining) as client:
            response = await client.post(f"{endpoint.url}/graphql", json=payload)
            return response.status_code, response.content

    import asyncio  # here: `list`, `validate` and `show` import this module and need no event loop

    try:
        return asyncio.run(asyncio.wait_for(send(), remaining))
    except (TimeoutError, httpx.TimeoutException):
        raise DeadlinePassed from None


@functools.cache
def _transport_class() -> type[Transport]:
    """The gql transport posting through `post_json` (made on first use: gql is imported only by remote commands)."""
    from gql.transport import Transport
    from gql.transport.exceptions import TransportProtocolError, TransportServerError
    from graphql import ExecutionResult

    class DeadlineTransport(Transport):
        """One POST per GraphQL request, all of them within the command's deadline."""

        def __init__(self, endpoint: Endpoint, deadline: Deadline) -> None:
            self.endpoint, self.deadline = endpoint, deadline

        def execute(self, request: Any, *args: Any, **kwargs: Any) -> ExecutionResult:
            status, body = post_json(self.endpoint, request.payload, self.deadline)
            refused = refusal_of(status, body)
            if refused is not None:
                raise refused
            try:
                result = json.loads(body)
            except ValueError:
                result = None
            if not isinstance(result, dict) or not ("data" in result or "errors" in result):
                if status >= 400:  # as gql's own HTTP transports: a non-GraphQL error answer is a server error
                    raise TransportServerError(f"HTTP {status}", status)
                raise TransportProtocolError(f"HTTP {status} without a GraphQL result")
            return ExecutionResult(data=result.get("data"), errors=result.get("errors"),
                                   extensions=result.get("extensions"))

    return DeadlineTransport


def _causes(exc: BaseException) -> list[BaseException]:
    causes: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(causes) < 10:
        causes.append(link)
        link = link.__cause__ or link.__context__
    return causes


class Webserver:
    """A Dagster webserver's GraphQL API as one command sees it: its endpoint and the command's deadline."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, *, wait: float = 0.0) -> None:
        self.endpoint = Endpoint.parse(url)
        self.timeout = timeout
        self.deadline = Deadline.after(timeout + wait)

    @property
    def url(self) -> str:
        return self.endpoint.url

    def refused(self, refused: AccessRefused, doing: str) -> RemoteError:
        """One sentence for a 401/403: whose credentials, what they may not do, and what to set."""
        credentials = self.endpoint.credentials
        if refused.status == 401:
            if credentials is None:
                return RemoteError(f"the webserver at {self.url} asks for credentials (401) and none were given: "
                                   f"set {USER_ENV} and {PASSWORD_ENV}")
            return RemoteError(f"the webserver at {self.url} refused the credentials of user {credentials[0]!r} "
                               f"(401): check {USER_ENV} and {PASSWORD_ENV} (or the user:password in --url)")
        who = f"user {credentials[0]!r}" if credentials else "a request without credentials"
        role = "viewer role" if "viewer role" in refused.reason else (refused.reason or "forbidden")
        return RemoteError(f"{who} may not {doing} on {self.url} (403: {role})")

    def explain(self, exc: Exception, run_id: str | None = None, job: str | None = None,
                doing: str = "do that") -> RemoteError:
        """One clear sentence for a DagsterGraphQLClientError (or anything the client raised)."""
        import httpx

        causes, url = _causes(exc), self.url
        kind = exc.args[0] if exc.args else ""
        detail = exc.args[1] if len(exc.args) > 1 else ""
        refused = next((c for c in causes if isinstance(c, AccessRefused)), None)
        if refused is not None:
            return self.refused(refused, doing)
        if any(isinstance(c, DeadlinePassed) for c in causes):
            return RemoteError(f"the Dagster webserver at {url} did not answer within the command's deadline of "
                               f"{self.deadline.seconds:g} s (raise it with --timeout)")
        if any(isinstance(c, httpx.TransportError) for c in causes) or "Error when connecting" in str(kind):
            refused = any(isinstance(c, ConnectionRefusedError) or "refused" in str(c) for c in causes)
            reason = "connection refused" if refused else "connection failed"
            return RemoteError(f"cannot reach the Dagster webserver at {url}: {reason}; "
                               "is `dagster-webserver` running there (check --url or MP_DAGSTER_URL)?")
        if kind in ("RunNotFoundError", "PipelineRunNotFoundError") or (run_id and "not found" in str(detail).lower()):
            return RemoteError(f"no run with id {run_id!r} on {url}")
        if kind in ("JobNotFoundError", "PipelineNotFoundError"):
            return RemoteError(f"no workflow job named {job!r} on {url}; add its file to MP_WORKFLOWS_PATH there "
                               "and run `mp-pipelines reload`")
        if kind == "TerminateRunFailure":
            return RemoteError(f"run {run_id} cannot be cancelled: {redact(str(detail))}")
        if kind in ("RunConfigValidationInvalid", "PipelineConfigValidationInvalid"):
            messages = [e.get("message", str(e)) if isinstance(e, dict) else str(e) for e in (detail or [])]
            return RemoteError("the webserver rejected the run config: " + redact("; ".join(messages)))
        if "Server error" in str(kind) or "Exception occured" in str(kind):
            return RemoteError(f"the webserver at {url} failed to answer the request "
                               f"({redact(str(kind).splitlines()[0])}); is this the Dagster webserver's URL?")
        text = f"{kind}: {detail}" if detail else str(kind or exc)
        return RemoteError(f"request to {url} failed: {redact(text)}")

    def _call(self, action: str, **kwargs: Any) -> Any:
        """`action` of the GraphQL client with `kwargs`; its errors become one RemoteError sentence."""
        from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

        endpoint = self.endpoint
        client = DagsterGraphQLClient(endpoint.hostname, port_number=endpoint.port, use_https=endpoint.use_https,
                                      path_prefix=endpoint.path_prefix,
                                      transport=_transport_class()(endpoint, self.deadline))
        try:
            return getattr(client, action)(**kwargs)
        except DagsterGraphQLClientError as exc:
            raise self.explain(exc, kwargs.get("run_id"), kwargs.get("job_name"), _DOING.get(action, action)) from None

    def launch(self, workflow: str, inputs: dict[str, Any], *, tags: dict[str, str] | None = None,
               executor: str | None = None, mode: str | None = None) -> str:
        """Submit a run of `workflow` (its job) with `inputs`; returns the run id."""
        from mp_pipelines.cli.config import run_config

        # The server's own console log level applies: only the local CLI quiets Dagster's console logger.
        config = run_config(inputs, executor, console_log_level=None, mode=mode)
        return self._call("submit_job_execution", job_name=workflow, run_config=config, tags=tags or None)

    def status(self, run_id: str) -> str:
        """The run's status name (QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, …)."""
        return self._call("get_run_status", run_id=run_id).value

    def cancel(self, run_id: str, poll: float = 0.25) -> None:
        """Terminate a queued or running run. Dagster refuses to terminate a run while its worker is STARTING
        (a moment after launch): wait for it to start, within the command's deadline, and terminate it then."""
        while True:
            try:
                self._call("terminate_run", run_id=run_id)
                return
            except RemoteError as exc:
                if "STARTING" not in exc.message or self.deadline.remaining() <= poll:
                    raise
            time.sleep(poll)

    def wait(self, run_id: str, seconds: float, poll: float = 1.0) -> str:
        """Poll until the run finishes; its final status. RemoteError after `seconds`."""
        until = time.monotonic() + seconds
        while True:
            status = self.status(run_id)
            if status in FINISHED:
                return status
            left = until - time.monotonic()
            if left <= 0:
                raise RemoteError(f"run {run_id} is still {status} after {seconds:g} s")
            time.sleep(min(poll, left))

    def location_names(self) -> list[str]:
        """The code locations the webserver serves."""
        import httpx

        query = "{ workspaceOrError { __typename ... on Workspace { locationEntries { name } } } }"
        try:
            status, body = post_json(self.endpoint, {"query": query}, self.deadline)
        except (DeadlinePassed, httpx.TransportError) as exc:
            raise self.explain(exc) from None
        refused = refusal_of(status, body)
        if refused is not None:
            raise self.refused(refused, "list code locations")
        try:
            entries = json.loads(body)["data"]["workspaceOrError"]["locationEntries"]
            return [entry["name"] for entry in entries]
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"could not list the code locations of {self.url}: HTTP {status} without a "
                              "workspace in the answer; is this the Dagster webserver's URL?") from None

    def reload(self, location: str | None = None) -> str:
        """Reload a code location (default: the only one) so new or removed workflow files show; its name."""
        if location is None:
            names = self.location_names()
            if len(names) != 1:
                raise RemoteError(f"{self.url} serves {len(names)} code locations ({', '.join(names) or 'none'}); "
                                  "name one with --location")
            location = names[0]
        info = self._call("reload_repository_location", repository_location_name=location)
        if info.status.value != "SUCCESS":
            raise RemoteError(f"reloading code location {location!r} on {self.url} failed: "
                              f"{info.failure_type or ''} {redact(info.message or '')}".strip())
        return location


_DOING = {"submit_job_execution": "launch runs", "get_run_status": "read run status",
          "terminate_run": "cancel runs", "reload_repository_location": "reload code locations"}

_url_option = click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True,
                           help=f"The Dagster webserver (or set {URL_ENV}).")
_timeout_option = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT,
                               show_default=True, metavar="SECONDS",
                               help="Most seconds the command may wait for the webserver's answers, all of them "
                                    "together (with --wait, on top of the wait).")


@click.command("launch")
@click.argument("workflow")
@_url_option
@input_options
@click.option("--tag", "tag_pairs", multiple=True, metavar="KEY=VALUE", help="A run tag; repeatable.")
@executor_option
@mode_option
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Wait up to SECONDS for the run to finish; exit 1 unless it succeeds.")
@_timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: run_id, status, url.")
def launch_command(workflow: str, url: str, pairs: tuple[str, ...], input_file: str | None,
                   tag_pairs: tuple[str, ...], executor: str | None, mode: str | None, wait_seconds: float | None,
                   timeout: float, as_json: bool) -> None:
    """Launch WORKFLOW on a running Dagster webserver (queued for the daemon) and print the run id."""
    inputs = parse_remote_inputs(workflow, pairs, input_file)
    tags = parse_pairs(tag_pairs, "--tag")
    server = Webserver(url, timeout, wait=wait_seconds or 0.0)
    run_id = server.launch(workflow, inputs, tags=tags, executor=executor, mode=mode)
    status = server.wait(run_id, wait_seconds) if wait_seconds is not None else server.status(run_id)
    run_url = f"{server.url}/runs/{run_id}"
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "status": status, "url": run_url}))
    else:
        click.echo(f"run {run_id}: {status}\n{run_url}")
    if wait_seconds is not None and status != "SUCCESS":
        raise SystemExit(1)


@click.command("status")
@click.argument("run_id")
@_url_option
@_timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: run_id, status.")
def status_command(run_id: str, url: str, timeout: float, as_json: bool) -> None:
    """Print the status of run RUN_ID on a Dagster webserver."""
    value = Webserver(url, timeout).status(run_id)
    click.echo(json.dumps({"run_id": run_id, "status": value}) if as_json else f"run {run_id}: {value}")


@click.command("cancel")
@click.argument("run_id")
@_url_option
@_timeout_option
def cancel_command(run_id: str, url: str, timeout: float) -> None:
    """Cancel (terminate) queued or running run RUN_ID on a Dagster webserver."""
    server = Webserver(url, timeout)
    server.cancel(run_id)
    click.echo(f"run {run_id}: cancel requested ({server.status(run_id)})")


@click.command("reload")
@_url_option
@_timeout_option
@click.option("--location", default=None, help="Code location to reload (default: the only one).")
def reload_command(url: str, timeout: float, location: str | None) -> None:
    """Reload the webserver's code location so added, changed or removed workflow files show."""
    server = Webserver(url, timeout)
    name = server.reload(location)
    click.echo(f"reloaded code location {name} on {server.url}")


