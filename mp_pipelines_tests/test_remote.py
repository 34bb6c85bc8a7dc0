"""`mp-pipelines launch/status/cancel/reload` against a real webserver (and daemon) on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from mp_pipelines.cli.main import main
from mp_pipelines.cli.remote import Endpoint, RemoteError
from mp_pipelines_tests.postgres import temporary_database
from mp_pipelines_tests.services import (
    LOCATION,
    DagsterServices,
    dagster_services,
    free_port,
    pg_env,
    wait_for,
    write_instance_config,
)
from mp_pipelines_tests.workflow_helpers import write_workflow

# Ten chained calls of MP_SIMULATED_LATENCY (2 s) each: a run that is still in its steps ~20 s after it starts,
# so a cancel that a loaded machine delays by seconds still lands in a step, not in the run's last moments
# (Dagster lets a run that has left its last step finish as SUCCESS).
SLOW = {"name": "slow_probe", "inputs": {"rounds": {"type": "integer", "default": 3}},
        "tasks": [{"name": "round_1", "prompt": "Think about round {{ inputs.rounds }}."}]
        + [{"name": f"round_{n}", "prompt": f"Think again: {{{{ round_{n - 1} }}}}"} for n in range(2, 11)]}
NEW = {"name": "added_later", "description": "Added while the server runs.",
       "tasks": [{"name": "outline", "prompt": "Outline something."},
                 {"name": "expand", "prompt": "Expand {{ outline }}"}]}


@dataclass
class Server:
    services: DagsterServices
    workflows: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Webserver + daemon on a fresh PostgreSQL database, with a workflows folder to add files to."""
    root = tmp_path_factory.mktemp("remote")
    workflows = root / "workflows"
    workflows.mkdir()
    write_workflow(workflows, SLOW)
    home = root / "dagster_home"
    write_instance_config(home)
    with temporary_database() as dbname:
        env = {**pg_env(dbname), "MP_WORKFLOWS_PATH": str(workflows), "MP_SIMULATED_LATENCY": "2"}
        with dagster_services(home, env) as services:
            yield Server(services, workflows)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def invoke(cli: CliRunner, *args: str) -> Result:
    return cli.invoke(main, list(args), catch_exceptions=False)


def test_launch_waits_for_success_and_status_reports_it(server: Server, cli: CliRunner) -> None:
    url = server.services.url
    result = invoke(cli, "launch", "research_report", "--url", url, "--input", "topic=remote launches",
                    "-i", "max_questions=2", "--executor", "in_process", "--wait", "180", "--json")
    assert result.exit_code == 0, result.output + server.services.diagnostics()
    launched = json.loads(result.stdout)
    assert launched["status"] == "SUCCESS" and launched["url"] == f"{url}/runs/{launched['run_id']}"
    status = invoke(cli, "status", launched["run_id"], "--url", url)
    assert status.exit_code == 0 and status.stdout.strip() == f"run {launched['run_id']}: SUCCESS"
    data = server.services.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { jobName runConfigYaml "
                                   "tags { key value } } } }", {"id": launched["run_id"]})["runOrError"]
    assert data["jobName"] == "research_report" and "topic: remote launches" in data["runConfigYaml"]
    assert "max_questions: 2" in data["runConfigYaml"]  # typed by the local spec: an integer, not "2"
    # a finished run cannot be cancelled, and the message says why
    cancelled = invoke(cli, "cancel", launched["run_id"], "--url", url)
    assert cancelled.exit_code == 1 and "cannot be cancelled" in cancelled.output


def test_cancel_stops_a_running_run(server: Server, cli: CliRunner) -> None:
    url = server.services.url
    launched = invoke(cli, "launch", "slow_probe", "--url", url, "--executor", "in_process", "--json")
    assert launched.exit_code == 0, launched.output
    run_id = json.loads(launched.stdout)["run_id"]
    wait_for(lambda: server.services.run_status(run_id) == "STARTED", 120, f"run {run_id} to start",
             diagnostics=server.services.diagnostics)
    result = invoke(cli, "cancel", run_id, "--url", url)
    assert result.exit_code == 0 and f"run {run_id}: cancel requested" in result.stdout
    wait_for(lambda: server.services.run_status(run_id) == "CANCELED", 120, f"run {run_id} to be canceled",
             diagnostics=server.services.diagnostics)


def test_unknown_run_ids_and_workflows_are_clear_errors(server: Server, cli: CliRunner) -> None:
    url = server.services.url
    for command in ("status", "cancel"):
        result = invoke(cli, command, "00000000-0000-0000-0000-000000000000", "--url", url)
        assert result.exit_code == 1
        assert f"no run with id '00000000-0000-0000-0000-000000000000' on {url}" in result.output
    result = invoke(cli, "launch", "no_such_workflow", "--url", url, "-i", "x=1")
    assert result.exit_code == 1 and "no workflow job named 'no_such_workflow'" in result.output
    result = invoke(cli, "launch", "research_report", "--url", url)  # the local spec checks inputs first
    assert result.exit_code == 2 and "input 'topic' of research_report is required" in result.output


def test_an_unreachable_server_is_a_clear_error(cli: CliRunner) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status", "some-run"], ["cancel", "some-run"], ["launch", "research_report", "-i", "topic=x"],
                 ["reload"]):
        result = invoke(cli, *args, "--url", url)
        assert result.exit_code == 1, args
        assert f"cannot reach the Dagster webserver at {url}: connection refused" in result.output, result.output
    result = invoke(cli, "status", "x", "--url", "ftp://example")
    assert result.exit_code == 1 and "is not an http(s) URL" in result.output


def test_endpoint_parsing() -> None:
    endpoint = Endpoint.parse("https://dagster.example.com/prefix/graphql/")
    assert (endpoint.hostname, endpoint.port, endpoint.use_https, endpoint.path_prefix) == (
        "dagster.example.com", None, True, "/prefix")
    assert Endpoint.parse("127.0.0.1:3000").url == "http://127.0.0.1:3000"
    with pytest.raises(RemoteError, match="invalid port"):
        Endpoint.parse("http://host:99999")


def test_a_new_workflow_file_appears_after_a_reload(server: Server, cli: CliRunner) -> None:
    services = server.services
    assert "added_later" not in services.job_names()
    write_workflow(server.workflows, NEW)
    assert "added_later" not in services.job_names()  # not before the code location reloads
    reloaded = services.graphql("""mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) {
        __typename ... on WorkspaceLocationEntry { locationOrLoadError { __typename } } } }""", {"name": LOCATION})
    assert reloaded["reloadRepositoryLocation"]["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    assert "added_later" in services.job_names()
    nodes = services.graphql('{ assetNodes(group: {groupName: "added_later", repositoryName: "__repository__", '
                             f'repositoryLocationName: "{LOCATION}"}}) {{ assetKey {{ path }} '
                             'dependencyKeys { path } } }')["assetNodes"]
    graph = {tuple(n["assetKey"]["path"]): [tuple(d["path"]) for d in n["dependencyKeys"]] for n in nodes}
    inputs = ("added_later", "inputs")  # the checked workflow inputs, an asset every task reads
    assert graph == {inputs: [], ("added_later", "outline"): [inputs],
                     ("added_later", "expand"): [inputs, ("added_later", "outline")]}
    # and it runs, launched remotely; removing the file and reloading (the CLI's `reload`) takes it away
    launched = invoke(cli, "launch", "added_later", "--url", services.url, "--executor", "in_process",
                      "--wait", "180")
    assert launched.exit_code == 0 and ": SUCCESS" in launched.stdout, launched.output
    (server.workflows / "added_later.yaml").unlink()
    result = invoke(cli, "reload", "--url", services.url)
    assert result.exit_code == 0 and f"reloaded code location {LOCATION}" in result.stdout
    assert "added_later" not in services.job_names()


def test_launch_arguments_are_checked_before_any_request(cli: CliRunner, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would fail with "cannot reach"
    result = invoke(cli, "launch", "research_report", "--url", url, "-i", "topic=x", "--tag", "team")
    assert result.exit_code == 2 and "'team' is not key=value" in result.output and "--tag" in result.output
    result = invoke(cli, "launch", "research_report", "--url", url, "-i", "topic=x", "--executor", "threads")
    assert result.exit_code == 2 and "'threads' is not one of" in result.output
    listed = tmp_path / "inputs.json"
    listed.write_text("[1]")
    result = invoke(cli, "launch", "not_here", "--url", url, "--input-file", str(listed))
    assert result.exit_code == 2 and "must hold a JSON object" in result.output


def test_remote_inputs_are_typed_by_the_local_spec_else_read_as_yaml(tmp_path: Path) -> None:
    from mp_pipelines.cli.args import parse_remote_inputs

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"topic": "tides", "extra": {"a": 1}}))
    assert parse_remote_inputs("research_report", ["topic=x", "max_questions=2"], None)["max_questions"] == 2
    with pytest.raises(click.BadParameter, match="unknown input\\(s\\) extra"):
        parse_remote_inputs("research_report", [], str(inputs))
    assert parse_remote_inputs("only_on_the_server", ["rounds=3", "topic=sea"], str(inputs)) == {
        "topic": "sea", "extra": {"a": 1}, "rounds": 3}


def test_credentials_in_the_url_are_used_but_never_printed(server: Server, cli: CliRunner) -> None:
    url = server.services.url
    secret_url = url.replace("http://", "http://alice:s3cret-pw@", 1)
    launched = invoke(cli, "launch", "slow_probe", "--url", secret_url, "--executor", "in_process", "--json")
    assert launched.exit_code == 0, launched.output
    run_id = json.loads(launched.stdout)["run_id"]
    assert json.loads(launched.stdout)["url"] == f"{url}/runs/{run_id}"
    outputs = [launched.output]
    for args, expected in ((["status", run_id], f"run {run_id}: "), (["cancel", run_id], "cancel requested"),
                           (["reload"], f"reloaded code location {LOCATION} on {url}")):
        result = invoke(cli, *args, "--url", secret_url)
        assert result.exit_code == 0 and expected in result.stdout, result.output
        outputs.append(result.output)
    assert not any("s3cret-pw" in output or "alice" in output for output in outputs)
