"""Bad weather and named providers, through real jobs, the real openai client and loopback servers.

Default settings (no `retries:`) outlast random 5xx and 429s; errors no retry can fix fail at once; a
circuit pauses calls to an endpoint that fails everything, then probes; a shard's step retry asks only for
its failed items; several providers serve one workflow, each with its own key and headers; fallback
models answer, and records say which.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines.cli.running import run_workflow
from mp_pipelines.spec.loader import WorkflowValidationError, load_workflow_file, parse_workflow
from mp_pipelines_tests.fault_server import FaultScript, RunningServer, make_fault
from mp_pipelines_tests.workflow_helpers import fan_workflow, materializations, run_file, write_workflow


def fan(name: str, items: int, *, breadth: int = 8, extra: str = "", task_extra: str = "") -> str:
    return fan_workflow(name, [f"w{i:04d}" for i in range(items)], breadth=breadth, extra=extra,
                        task_extra=task_extra)


def echoed(server: RunningServer) -> Counter:
    """Requests per item word, as the server saw them."""
    prompts = [r.body["messages"][-1]["content"] for r in server.requests if isinstance(r.body, dict)]
    return Counter(p.removeprefix("Echo ") for p in prompts if p.startswith("Echo "))


def run_with_progress(path: Path, instance: dg.DagsterInstance, lines: list[str]):
    spec = load_workflow_file(path)
    return run_workflow(spec, {}, source=str(path.resolve()), executor="in_process", instance=instance,
                        progress=lines.append)


def test_default_settings_outlast_20_percent_random_5xx(llm_server_factory, instance: dg.DagsterInstance,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 items, no `retries:`; 20 % of requests answer 500 or 503 (seeded): every item is answered once."""
    server = llm_server_factory(faults=FaultScript(0.2, seed=7, kinds=["server_error", "unavailable"]))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    lines: list[str] = []
    outcome = run_with_progress(write_workflow(tmp_path, fan("weather5xx", 200)), instance, lines)
    assert outcome.success, outcome.as_text()
    assert [o.split("Echo ")[-1][:5] for o in outcome.tasks["echo"]["output"]] == [f"w{i:04d}" for i in range(200)]
    faults = sum(r.fault is not None for r in server.requests)
    assert faults > 20 and len(server.requests) == 200 + faults
    assert set(echoed(server)) == {f"w{i:04d}" for i in range(200)}
    usage = outcome.as_json()["usage"]
    assert usage["calls"] == 200 and usage["retries"] == faults and usage["rate_limited"] == 0
    (echo,) = [e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "echo"]
    assert echo.metadata["retries"].value == faults and echo.metadata["calls"].value == 200
    assert any(line.strip().startswith("↻ echo[") and "HTTP 5" in line for line in lines), lines[:20]


def test_default_settings_outlast_30_percent_429(llm_server_factory, instance: dg.DagsterInstance,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 items; 30 % of requests answer 429 with a short Retry-After: all succeed, each 429 retried once."""
    throttled = make_fault("rate_limit", headers={"retry-after": "0.05"})
    server = llm_server_factory(faults=FaultScript(0.3, seed=3, kinds=[throttled]))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    lines: list[str] = []
    outcome = run_with_progress(write_workflow(tmp_path, fan("weather429", 200)), instance, lines)
    assert outcome.success, outcome.as_text()
    assert [o.split("Echo ")[-1][:5] for o in outcome.tasks["echo"]["output"]] == [f"w{i:04d}" for i in range(200)]
    rate_limited = sum(r.fault == "rate_limit" for r in server.requests)
    assert rate_limited > 40 and len(server.requests) == 200 + rate_limited
    usage = outcome.as_json()["usage"]
    assert usage["rate_limited"] == rate_limited and usage["retries"] == rate_limited
    assert any(line.strip().startswith("⏸ echo[") and "HTTP 429" in line for line in lines)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_errors_no_retry_can_fix_fail_at_once(status: int, openai_env: RunningServer, instance: dg.DagsterInstance,
                                              tmp_path: Path) -> None:
    openai_env.faults.add(status=status, times=5)
    path = write_workflow(tmp_path, "name: once\ntasks:\n  - name: ask\n    prompt: hello\n")
    outcome = run_file(path, {}, instance)
    assert not outcome.success
    assert len(openai_env.requests) == 1, "a refused request is not sent again"
    assert f"HTTP {status}" in outcome.tasks["ask"]["error"]
    assert "sk-test-not-a-real-key" not in outcome.as_text()


def test_circuit_opens_on_an_endpoint_that_fails_everything_then_probes(
        llm_server_factory, instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request fails for 4 s: after 10 failures in a row calls pause and single probes test the endpoint;
    once it answers, the circuit closes and every item succeeds."""
    server = llm_server_factory(faults=FaultScript(1.0, kinds=["unavailable"]))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("MP_CIRCUIT_COOLDOWN", "1")
    monkeypatch.setenv("MP_RETRY_BASE_DELAY", "0.05")
    stop = threading.Event()

    def heal_4_s_after_the_first_request() -> None:
        while not server.requests and not stop.wait(0.01):
            pass
        stop.wait(4.0)
        server.faults.failure_rate = 0.0

    healer = threading.Thread(target=heal_4_s_after_the_first_request, daemon=True)
    healer.start()
    lines: list[str] = []
    try:
        path = write_workflow(tmp_path, fan("circuit", 8, breadth=4, task_extra="\n    shard_size: 8"))
        outcome = run_with_progress(path, instance, lines)
    finally:
        stop.set()
        healer.join()
    assert outcome.success, outcome.as_text()
    failed = [r for r in server.requests if r.fault is not None]
    # Without the circuit, 4 items retrying every ~0.05-0.4 s would send dozens of requests in 4 s.
    assert 10 <= len(failed) <= 10 + 4 + 4, f"{len(failed)} failed requests: the circuit did not pause the calls"
    opened = [line for line in lines if "circuit of" in line and "open after 10 failures" in line]
    assert opened and any("closed: the probe was answered" in line for line in lines), lines
    gaps = [b.time - a.time for a, b in zip(failed[9:], failed[10:])]
    assert gaps and max(gaps) >= 0.9, "after opening, the next request waits for the cool-down"


def test_a_retried_shard_asks_only_for_its_failed_items(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                         tmp_path: Path) -> None:
    """One shard of 6 items; item w0003 fails its call's 2 attempts, so the step fails and its RetryPolicy
    retries it: the 5 answered items come from the run's checkpoint, only w0003 is asked again."""
    openai_env.faults.add_for("Echo w0003", "unavailable", times=3)
    task_extra = "\n    shard_size: 6\n    retries: {max_retries: 1, delay: 0}"
    outcome = run_file(write_workflow(tmp_path, fan("reshard", 6, task_extra=task_extra)), {}, instance)
    assert outcome.success, outcome.as_text()
    counts = echoed(openai_env)
    assert counts["w0003"] == 4, counts  # 2 attempts in the first step, then 1 failure and the answer
    assert all(counts[f"w{i:04d}"] == 1 for i in (0, 1, 2, 4, 5)), counts
    assert [o.split("Echo ")[-1][:5] for o in outcome.tasks["echo"]["output"]] == [f"w{i:04d}" for i in range(6)]


TWO_PROVIDERS = """
name: two_providers
cache: off
providers:
  drafts: {{base_url: "{a}", api_key_env: DRAFTS_KEY, headers: {{X-Team: drafting}}}}
  final: {{base_url: "{b}", api_key_env: FINAL_KEY, headers: {{X-Team: reporting}}, limits: {{max_in_flight: 2}}}}
inputs:
  topics: {{type: list, default: [owls, bats, moths]}}
tasks:
  - name: draft
    for_each: inputs.topics
    model: drafts/meta-llama/Llama-3.1-8B-Instruct
    prompt: "Draft about {{{{ item }}}}"
  - name: report
    depends_on: [draft]
    model: final/gpt-4o
    prompt: "Report on {{{{ draft | join(' ') }}}}"
  - name: local
    model: meta-llama/Llama-3.1-8B-Instruct
    prompt: "Default endpoint"
"""


def test_two_providers_in_one_workflow(llm_server_factory, openai_env: RunningServer, instance: dg.DagsterInstance,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drafts, final = llm_server_factory(api_key="drafts-secret-1"), llm_server_factory(api_key="final-secret-2")
    monkeypatch.setenv("DRAFTS_KEY", "drafts-secret-1")
    monkeypatch.setenv("FINAL_KEY", "final-secret-2")
    path = write_workflow(tmp_path, TWO_PROVIDERS.format(a=drafts.base_url, b=final.base_url))
    outcome = run_file(path, {}, instance)
    assert outcome.success, outcome.as_text()
    assert [r.body["model"] for r in drafts.requests] == ["meta-llama/Llama-3.1-8B-Instruct"] * 3
    assert {r.headers.get("x-team") for r in drafts.requests} == {"drafting"}
    assert [r.body["model"] for r in final.requests] == ["gpt-4o"]
    assert final.requests[0].headers.get("x-team") == "reporting"
    assert final.requests[0].body["messages"][-1]["content"].startswith("Report on")
    # `meta-llama/...` names no declared provider: it is a model id for the run's own endpoint.
    assert [r.body["model"] for r in openai_env.requests] == ["meta-llama/Llama-3.1-8B-Instruct"]
    tasks = outcome.as_json()["tasks"]
    assert tasks["draft"]["models"] == {"drafts/meta-llama/Llama-3.1-8B-Instruct": 3}
    assert tasks["report"]["models"] == {"final/gpt-4o": 1}
    text = repr([e.metadata for e in materializations(instance, outcome.run_id)])
    assert "secret" not in text and "final/gpt-4o" in text

    # A key variable that is not set fails the task, naming the provider and the variable, never a key.
    monkeypatch.delenv("FINAL_KEY")
    drafts.reset(), final.reset()
    failed = run_file(path, {}, instance)
    assert not failed.success and failed.tasks["draft"]["status"] == "success"
    error = failed.tasks["report"]["error"]
    assert "provider 'final'" in error and "FINAL_KEY" in error and "not set" in error
    assert "secret" not in failed.as_text() and not final.requests


def test_fallback_answers_and_is_labelled(llm_server_factory, instance: dg.DagsterInstance, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary fails every request: after its retries (then its open circuit) the backup answers each item,
    and records, run --json and metadata name the backup."""
    down = llm_server_factory(faults=FaultScript(1.0, kinds=["unavailable"]))
    backup = llm_server_factory()
    monkeypatch.setenv("MP_RETRY_BASE_DELAY", "0.01")
    extra = (f'providers:\n  down: {{base_url: "{down.base_url}"}}\n  backup: {{base_url: "{backup.base_url}"}}\n'
             "defaults: {model: down/m1}\nfallback: [backup/m2]")
    outcome = run_file(write_workflow(tmp_path, fan("fallback", 6, breadth=2, extra=extra)), {}, instance)
    assert outcome.success, outcome.as_text()
    assert len(backup.requests) == 6 and {r.body["model"] for r in backup.requests} == {"m2"}
    assert down.requests and {r.body["model"] for r in down.requests} == {"m1"}
    assert len(down.requests) <= 10 + 2, "once the circuit opens the primary is not asked, the fallback answers"
    assert outcome.as_json()["tasks"]["echo"]["models"] == {"backup/m2": 6}
    (echo,) = [e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "echo"]
    assert echo.metadata["model"].value == "backup/m2"


@pytest.mark.parametrize(("fragment", "path", "reason"), [
    ("providers:\n  vllm: {base_url: 'http://localhost:8000/v1'}\ndefaults: {model: vlm/llama}",
     "defaults.model", "unknown provider 'vlm'"),
    ("providers:\n  p: {base_url: 'http://localhost/v1', headers: {Authorization: 'Bearer sk-1'}}",
     "providers.p.headers", "carries a credential"),
    ("providers:\n  p: {base_url: 'http://me:pw@localhost/v1'}", "providers.p.base_url", "must not hold credentials"),
    ("providers:\n  p: {base_url: 'http://localhost/v1', api_key_env: 'sk-abc123'}", "providers.p.api_key_env",
     "not an environment variable name"),
    ("defaults: {model: gpt-4o}\nfallback: [gpt-4o]", "task echo.fallback[0]", "the task's own model"),
])
def test_provider_and_fallback_mistakes_are_named(fragment: str, path: str, reason: str) -> None:
    data = fan("bad", 2, extra=fragment)
    import yaml

    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(yaml.safe_load(data), source="bad.yaml")
    assert any(p.file == "bad.yaml" and p.path.startswith(path) and reason in p.message
               for p in caught.value.problems), caught.value.problems
    assert "sk-1" not in str(caught.value) or "headers" not in path


def test_providers_file_is_shared_and_its_mistakes_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    shared = tmp_path / "providers.yaml"
    shared.write_text("providers:\n  lab: {base_url: 'http://127.0.0.1:9/v1', api_key_env: LAB_KEY}\n")
    monkeypatch.setenv("MP_PROVIDERS_FILE", str(shared))
    spec = parse_workflow(yaml.safe_load(fan("shared", 2, extra="defaults: {model: lab/m}")), source="w.yaml")
    from mp_pipelines.spec.providers import declared_providers

    assert declared_providers(spec)["lab"].api_key_env == "LAB_KEY"
    shared.write_text("providers:\n  lab: {base_url: 'ftp://x', api_key_env: LAB_KEY}\n")
    with pytest.raises(WorkflowValidationError) as caught:
        parse_workflow(yaml.safe_load(fan("shared", 2)), source="w.yaml")
    (problem,) = caught.value.problems
    assert problem.file == str(shared) and problem.path.startswith("providers.lab") and "http(s) URL" in problem.message
    monkeypatch.setenv("MP_PROVIDERS_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(WorkflowValidationError, match="providers file .MP_PROVIDERS_FILE. does not exist"):
        parse_workflow(yaml.safe_load(fan("shared", 2)), source="w.yaml")


def test_retry_budget_defaults_and_a_tasks_retries_override_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from mp_pipelines.calls.retry import DEFAULT_RETRY, retry_budget
    from mp_pipelines.spec.models import RetrySpec

    assert retry_budget(None) == DEFAULT_RETRY and DEFAULT_RETRY.attempts == 16 and DEFAULT_RETRY.window == 900
    # Full jitter: uniform in [0, min(30, 0.5 × 2^(n-1))]; a Retry-After is waited at least (at most 60 s).
    assert DEFAULT_RETRY.delay_before(1, None, 0.999) == pytest.approx(0.4995)
    assert DEFAULT_RETRY.delay_before(4, None, 0.5) == pytest.approx(2.0)
    assert DEFAULT_RETRY.delay_before(12, None, 1.0) == 30.0
    assert DEFAULT_RETRY.delay_before(1, 2.5, 0.0) == 2.5 and DEFAULT_RETRY.delay_before(1, 600, 0.0) == 60.0
    task = retry_budget(RetrySpec(max_retries=2, delay=1.5, backoff="linear"))
    assert task.attempts == 3 and task.delay_before(2, None, 0.3) == 3.0
    monkeypatch.setenv("MP_RETRY_BASE_DELAY", "0.01")
    assert retry_budget(None).delay == 0.01 and retry_budget(None).attempts == 16
    monkeypatch.setenv("MP_RETRY_BASE_DELAY", "soon")
    with pytest.raises(ValueError, match="MP_RETRY_BASE_DELAY='soon' is not valid"):
        retry_budget(None)


def test_a_spent_retry_budget_says_so(openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    """A task's `retries:` is its calls' budget: 3 attempts of a 503, then the task fails saying so."""
    openai_env.faults.add("unavailable", times=10)
    path = write_workflow(tmp_path, "name: spent\ntasks:\n  - name: ask\n    prompt: hello\n"
                                    "    retries: {max_retries: 2, delay: 0}\n")
    outcome = run_file(path, {}, instance)
    assert not outcome.success
    error = outcome.tasks["ask"]["error"]
    assert "HTTP 503" in error and "after 3 attempts" in error and "retry budget (3 attempts" in error
    # The step's RetryPolicy then ran the step twice more, each with its own 3 attempts: 9 requests in all.
    assert len(openai_env.requests) == 9
