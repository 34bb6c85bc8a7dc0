"""The front door (deploy/nginx) and the input roots, with the real parts: nginx with the shipped config and its
njs guard, dagster-webserver on loopback behind it, the remote CLI, and a loopback OpenAI-compatible model server
that records every request, so "nothing was read" is checked as "the model never saw it".
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from websockets.sync.client import connect

from mp_pipelines.cli.main import main
from mp_pipelines_tests.fault_server import RunningServer, run_server
from mp_pipelines_tests.proxy import GUARD, NGINX, Proxy, nginx_proxy, render_site
from mp_pipelines_tests.services import DagsterServices, dagster_services, unavailable, wait_for
from mp_pipelines_tests.workflow_helpers import write_workflow

VIEWER = ("vera", "viewer-pw-7c1")
OPERATOR = ("otto", "operator-pw-93f")
API_KEY = "sk-test-front-door"
CANARY = "CANARY-outside-the-roots-5d1e"
NOTES = {"name": "read_notes", "description": "Summaries of a folder of notes.",
         "inputs": {"notes": {"type": "table", "default": "notes"}},
         "tasks": [{"name": "summarize", "for_each": "inputs.notes", "prompt": "Summarize: {{ item.text }}"}]}
LAUNCH = """mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
LOCATION = "mp_pipelines.definitions:defs"


@dataclass
class FrontDoor:
    services: DagsterServices
    proxy: Proxy
    model: RunningServer
    workflows: Path
    outside: Path  # a folder outside every input root, holding the canary

    @property
    def graphql(self) -> str:
        return f"{self.proxy.url}/graphql"

    def launch_params(self, notes: str) -> dict:
        return {"selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                             "jobName": "read_notes"},
                "runConfigData": {"ops": {"inputs": {"config": {"notes": notes}}}}}

    def run(self, run_id: str) -> dict:
        query = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status
                     stepStats { stepKey status } } } }"""
        return self.services.graphql(query, {"id": run_id})["runOrError"]

    def run_count(self) -> int:
        return len(self.services.graphql("{ runsOrError { ... on Runs { results { runId } } } }")
                   ["runsOrError"]["results"])

    def failure_messages(self, run_id: str) -> str:
        query = """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
                     ... on MessageEvent { message } ... on ExecutionStepFailureEvent { error { message } } } } } }"""
        events = self.services.graphql(query, {"id": run_id})["logsForRun"]["events"]
        return "\n".join(json.dumps(event) for event in events)


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    """Model server, webserver on loopback (SQLite instance, runs launched by the webserver) and nginx in front."""
    root = tmp_path_factory.mktemp("front_door")
    workflows = root / "workflows"
    (workflows / "notes").mkdir(parents=True)
    (workflows / "notes" / "a.txt").write_text("The quarterly numbers are fine.")
    write_workflow(workflows, NOTES)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{CANARY}: the server's own file")
    (outside / "secret.csv").write_text(f"text\n{CANARY}\n")
    home = root / "home"
    home.mkdir()
    # No daemon here: the webserver launches each run itself, in its own process.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster._core.run_coordinator\n"
                                       "  class: DefaultRunCoordinator\n")
    with run_server(api_key=API_KEY) as model:
        env = {"MP_WORKFLOWS_PATH": str(workflows), "OPENAI_BASE_URL": model.base_url, "OPENAI_API_KEY": API_KEY}
        with dagster_services(home, env, daemon=False) as services:
            upstream = services.url.removeprefix("http://")
            with nginx_proxy(upstream, {"viewers": dict([VIEWER]), "operators": dict([OPERATOR])}) as proxy:
                yield FrontDoor(services, proxy, model, workflows, outside)


def post(door: FrontDoor, body: object, auth: tuple[str, str] | None = VIEWER, **kwargs) -> httpx.Response:
    return httpx.post(door.graphql, json=body, auth=auth, timeout=30, **kwargs)


# --- the proxy: authentication and roles ------------------------------------------------------------------------


def test_no_or_wrong_credentials_get_401_everywhere(door: FrontDoor) -> None:
    for auth in (None, (VIEWER[0], "wrong"), (OPERATOR[0], VIEWER[1]), ("nobody", "x")):
        assert post(door, {"query": "{ version }"}, auth=auth).status_code == 401
        assert httpx.get(door.proxy.url + "/runs", auth=auth, timeout=30).status_code == 401


def test_a_viewer_reads_everything(door: FrontDoor) -> None:
    answer = post(door, {"query": "query Jobs { repositoriesOrError { ... on RepositoryConnection "
                                  "{ nodes { jobs { name } } } } }", "operationName": "Jobs"})
    assert answer.status_code == 200
    jobs = {job["name"] for node in answer.json()["data"]["repositoriesOrError"]["nodes"] for job in node["jobs"]}
    assert "read_notes" in jobs
    fragment = "fragment V on Query { version } # a comment with mutation in it\n{ ...V }"
    assert post(door, {"query": fragment}).json()["data"]["version"]
    # the word in strings, comments and variables is no mutation
    wordy = post(door, {"query": 'query Q($t: String!) { runsOrError(filter: {tags: [{key: $t, value: '
                                 '"""mutation { terminateRun }"""}, {key: "mutation {", value: "x"}]}) '
                                 '{ __typename } } # mutation {',
                        "variables": {"t": "mutation { terminateRun(runId: \"x\") }"}})
    assert wordy.status_code == 200 and wordy.json()["data"]["runsOrError"]["__typename"] == "Runs", wordy.text
    got = httpx.get(door.graphql, params={"query": "{ version }"}, auth=VIEWER, timeout=30)
    assert got.status_code == 200 and got.json()["data"]["version"]
    page = httpx.get(door.proxy.url + "/runs", auth=VIEWER, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()


MUTATIONS = {
    "launchPipelineExecution": ('mutation { launchPipelineExecution(executionParams: {selector: '
                                '{repositoryLocationName: "mp_pipelines.definitions:defs", repositoryName: '
                                '"__repository__", jobName: "read_notes"}}) { __typename } }'),
    "launchRunReexecution": ('mutation { launchRunReexecution(reexecutionParams: {parentRunId: "x", '
                             'strategy: FROM_FAILURE}) { __typename } }'),
    "terminateRun": 'mutation { terminateRun(runId: "x") { __typename } }',
    "reloadRepositoryLocation": f'mutation {{ reloadRepositoryLocation(repositoryLocationName: "{LOCATION}") '
                                '{ __typename } }',
    "deleteRun": 'mutation { deletePipelineRun(runId: "x") { __typename } }',
    "wipeAssets": 'mutation { wipeAssets(assetPartitionRanges: []) { __typename } }',
}
RELOAD = MUTATIONS["reloadRepositoryLocation"]


def test_every_mutation_from_a_viewer_is_403_whatever_the_transport(door: FrontDoor) -> None:
    before = door.run_count()
    for name, mutation in MUTATIONS.items():
        answer = post(door, {"query": mutation})
        assert answer.status_code == 403, (name, answer.text)
        assert "viewer role" in answer.json()["errors"][0]["message"]
    tricks = [
        {"query": "# launch it\n" + RELOAD},
        {"query": "\ufeff ,,\n" + RELOAD},
        {"query": "query Harmless { version } " + RELOAD, "operationName": "Harmless"},
        {"query": RELOAD.replace("mutation {", "mutation Reload {"), "operationName": "Harmless"},
        {"query": "fragment F on Query { version } " + RELOAD},
        {"query": RELOAD.replace("reloadRepositoryLocation(", "harmless: reloadRepositoryLocation(")},
        {"query": '{ version } """block " string""" ' + RELOAD},
        {"query": "{ version(a: \"}\") } " + RELOAD},
        {"query": "subscription { pipelineRunLogs(runId: \"x\") { __typename } } " + RELOAD},
        {"query": RELOAD, "variables": {"query": "{ version }"}},
        {"query": ["{ version }"]},
        {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "0" * 64}}},
    ]
    for body in tricks:
        assert post(door, body).status_code == 403, body
    batch = post(door, [{"query": "{ version }"}, {"query": RELOAD}])
    assert batch.status_code == 403
    unicode_escaped = '{"query": "\\u006dutation { terminateRun(runId: \\"x\\") { __typename } }"}'
    assert httpx.post(door.graphql, content=unicode_escaped, headers={"Content-Type": "application/json"},
                      auth=VIEWER, timeout=30).status_code == 403
    assert httpx.post(door.graphql, content="# first a comment\n" + RELOAD,
                      headers={"Content-Type": "application/graphql"}, auth=VIEWER, timeout=30).status_code == 403
    for params in ({"query": RELOAD}, [("query", "{ version }"), ("query", RELOAD)]):
        assert httpx.get(door.graphql, params=params, auth=VIEWER, timeout=30).status_code == 403
    # A body Dagster ignores (form-encoded) and the mutation in the URL, as Dagster then reads it.
    assert httpx.post(door.graphql, params={"query": RELOAD}, data={"x": "1"}, auth=VIEWER,
                      timeout=30).status_code == 403
    assert httpx.post(door.graphql, content=b'{"query": "{ version }"', headers={"Content-Type": "application/json"},
                      auth=VIEWER, timeout=30).status_code == 403  # unreadable JSON: refused, not passed on
    assert httpx.put(door.graphql, json={"query": "{ version }"}, auth=VIEWER, timeout=30).status_code == 403
    assert httpx.post(door.proxy.url + "/report_asset_materialization/read_notes/summarize", json={},
                      auth=VIEWER, timeout=30).status_code == 403
    assert door.run_count() == before  # nothing launched through any of them


def test_a_mutation_over_the_websocket_does_nothing(door: FrontDoor) -> None:
    """nginx cannot read websocket frames: Dagster's websocket endpoint runs subscriptions only, checked here
    through the proxy as a viewer, with a launch that would otherwise start a run."""
    before = door.run_count()
    token = base64.b64encode(f"{VIEWER[0]}:{VIEWER[1]}".encode()).decode()
    url = door.graphql.replace("http://", "ws://")
    with connect(url, subprotocols=["graphql-ws"], additional_headers={"Authorization": f"Basic {token}"},
                 open_timeout=30) as socket:
        socket.send(json.dumps({"type": "connection_init", "payload": {}}))
        assert json.loads(socket.recv(timeout=30))["type"] == "connection_ack"
        socket.send(json.dumps({"type": "start", "id": "1", "payload": {
            "query": LAUNCH, "variables": {"params": door.launch_params("notes")}}}))
        answer = json.loads(socket.recv(timeout=30))
    assert answer["type"] == "error" and "launchPipelineExecution" in json.dumps(answer), answer
    assert door.run_count() == before
    with pytest.raises(Exception, match="401"):
        with connect(url, subprotocols=["graphql-ws"], open_timeout=30):
            pass


def test_an_operator_launches_a_run_that_succeeds(door: FrontDoor) -> None:
    answer = post(door, {"query": LAUNCH, "variables": {"params": door.launch_params("notes")}}, auth=OPERATOR)
    assert answer.status_code == 200, answer.text
    launched = answer.json()["data"]["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    status = wait_for(lambda: door.run(run_id)["status"] in ("SUCCESS", "FAILURE") and door.run(run_id)["status"],
                      180, f"run {run_id}", diagnostics=door.services.diagnostics)
    assert status == "SUCCESS", door.failure_messages(run_id)
    reload = post(door, {"query": RELOAD}, auth=OPERATOR)
    assert reload.status_code == 200 and "reloadRepositoryLocation" in reload.json()["data"]


# --- the remote CLI through the proxy -----------------------------------------------------------------------------


def invoke(monkeypatch: pytest.MonkeyPatch, credentials: tuple[str, str] | None, *args: str) -> Result:
    for name in ("MP_DAGSTER_USER", "MP_DAGSTER_PASSWORD", "MP_DAGSTER_URL"):
        monkeypatch.delenv(name, raising=False)
    if credentials:
        monkeypatch.setenv("MP_DAGSTER_USER", credentials[0])
        monkeypatch.setenv("MP_DAGSTER_PASSWORD", credentials[1])
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_the_remote_cli_works_with_operator_credentials_and_fails_clearly_without(
        door: FrontDoor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    url = door.proxy.url
    launched = invoke(monkeypatch, OPERATOR, "launch", "read_notes", "--url", url, "--input", "notes=notes",
                      "--wait", "180", "--json")
    assert launched.exit_code == 0, launched.output
    run_id = json.loads(launched.stdout)["run_id"]
    assert json.loads(launched.stdout) == {"run_id": run_id, "status": "SUCCESS", "url": f"{url}/runs/{run_id}"}
    reloaded = invoke(monkeypatch, OPERATOR, "reload", "--url", url)
    assert reloaded.exit_code == 0 and f"reloaded code location {LOCATION} on {url}" in reloaded.stdout

    anonymous = invoke(monkeypatch, None, "status", run_id, "--url", url)
    assert anonymous.exit_code == 1
    assert (f"the webserver at {url} asks for credentials (401) and none were given: set MP_DAGSTER_USER and "
            "MP_DAGSTER_PASSWORD") in anonymous.output
    wrong = invoke(monkeypatch, (OPERATOR[0], "not-the-password"), "status", run_id, "--url", url)
    assert wrong.exit_code == 1
    assert f"the webserver at {url} refused the credentials of user 'otto' (401)" in wrong.output

    viewer_status = invoke(monkeypatch, VIEWER, "status", run_id, "--url", url)
    assert viewer_status.exit_code == 0 and f"run {run_id}: SUCCESS" in viewer_status.stdout
    for args, doing in ((["launch", "read_notes"], "launch runs"), (["cancel", run_id], "cancel runs"),
                        (["reload", "--location", LOCATION], "reload code locations")):
        refused = invoke(monkeypatch, VIEWER, *args, "--url", url)
        assert refused.exit_code == 1
        assert f"user 'vera' may not {doing} on {url} (403: viewer role)" in refused.output, refused.output
    monkeypatch.setenv("MP_DAGSTER_USER", "otto")
    monkeypatch.delenv("MP_DAGSTER_PASSWORD")
    half = CliRunner().invoke(main, ["status", run_id, "--url", url], catch_exceptions=False)
    assert half.exit_code == 1 and "MP_DAGSTER_PASSWORD is not set" in half.output
    every_output = launched.output + reloaded.output + anonymous.output + wrong.output + viewer_status.output
    assert OPERATOR[1] not in every_output and VIEWER[1] not in every_output and "not-the-password" not in every_output


# --- input roots on a Launchpad/GraphQL launch ----------------------------------------------------------------------


def test_a_launch_with_a_path_outside_the_roots_fails_before_reading_it(door: FrontDoor) -> None:
    door.model.reset()
    link = door.workflows / "notes_link"
    if not link.exists():
        link.symlink_to(door.outside, target_is_directory=True)
    for notes in (str(door.outside), "../outside", str(link), str(door.outside / "secret.csv")):
        answer = post(door, {"query": LAUNCH, "variables": {"params": door.launch_params(notes)}}, auth=OPERATOR)
        run_id = answer.json()["data"]["launchPipelineExecution"]["run"]["runId"]
        status = wait_for(lambda run_id=run_id: door.run(run_id)["status"] in ("SUCCESS", "FAILURE")
                          and door.run(run_id)["status"], 180, f"run {run_id}", diagnostics=door.services.diagnostics)
        assert status == "FAILURE"
        steps = {step["stepKey"]: step["status"] for step in door.run(run_id)["stepStats"]}
        assert steps.get("read_notes__inputs") == "FAILURE" and not any(
            key.startswith("read_notes__summarize") for key in steps), steps
        messages = door.failure_messages(run_id)
        assert "input 'notes'" in messages and "outside the allowed input roots" in messages, messages
        assert str(door.workflows) in messages  # the roots are named
        assert CANARY not in messages
    assert door.model.requests == []  # the model never saw a thing, let alone the canary
    assert not any(CANARY in json.dumps(r.body) for r in door.model.requests)


def test_the_shipped_guard_is_what_runs(door: FrontDoor) -> None:
    """The proxy under test loads deploy/nginx's files, not a copy edited for the tests."""
    shipped = (Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "graphql_guard.js").read_text()
    assert (door.proxy.folder / "graphql_guard.js").read_text() == shipped
    assert os.path.exists(door.proxy.folder / "site.conf")


def test_the_shipped_site_file_loads_in_debians_own_nginx_conf(tmp_path: Path) -> None:
    """Installed as docs/deployment.md says (conf.d, njs module enabled by its package), `nginx -t` accepts it."""
    if not Path("/etc/nginx/nginx.conf").exists():
        unavailable("Debian's nginx is not installed: apt-get install nginx-light libnginx-mod-http-js (.ci/run does)")
    debian = Path("/etc/nginx/nginx.conf").read_text()
    assert "include /etc/nginx/conf.d/*.conf;" in debian and "modules-enabled" in debian
    site = tmp_path / "site.conf"
    site.write_text(render_site(tmp_path, 8080, "127.0.0.1:3000"))
    (tmp_path / "graphql_guard.js").write_text(GUARD.read_text())
    (tmp_path / "nginx.conf").write_text(debian.replace("include /etc/nginx/conf.d/*.conf;", f"include {site};")
                                         .replace("include /etc/nginx/sites-enabled/*;", ""))
    checked = subprocess.run([NGINX, "-t", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0 and "test is successful" in checked.stderr, checked.stderr
