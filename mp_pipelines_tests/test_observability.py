"""Traces, metrics, logs and usage statistics against real receivers.

The OTLP receiver is a real HTTP server on loopback that decodes what the OpenTelemetry SDK's exporter sends with
opentelemetry-proto (`otlp_receiver.py`); model calls go through the real openai client to the loopback
OpenAI-compatible server (`fault_server.py`), or the simulated model behind the client's transport.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from mp_pipelines.cli.main import main
from mp_pipelines.cli.usage_stats import parse_since, percentile, usage_rows
from mp_pipelines.telemetry.setup import active, instance_label, shutdown, trace_id_hex
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.otlp_receiver import OTLPReceiver, ReceivedSpan
from mp_pipelines_tests.prometheus_services import prometheus_with_pushgateway
from mp_pipelines_tests.workflow_helpers import materializations, run_file, write_workflow

FAKE_KEY = "sk-test-not-a-real-key"
TELEMETRY_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_SEMCONV_STABILITY_OPT_IN",
                 "MP_TRACE_CONTENT", "MP_PROMETHEUS_PUSHGATEWAY", "MP_LOG_FORMAT", "OTEL_SERVICE_NAME")


@pytest.fixture(autouse=True)
def _no_ambient_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the telemetry environment it wants."""
    for name in TELEMETRY_ENV:
        monkeypatch.delenv(name, raising=False)


def cli_run(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`mp-pipelines ARGS` in a child process (its own instance under tmp_path), with `env` added."""
    full_env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_ENV and k != "DAGSTER_HOME"}
    return subprocess.run([sys.executable, "-m", "mp_pipelines.cli", *args], cwd=tmp_path, text=True,
                          capture_output=True, env={**full_env, **env}, timeout=300)


def step_keys(tmp_path: Path, run_id: str) -> set[str]:
    """The steps the run started, from its event log."""
    with dg.DagsterInstance.local_temp(str(tmp_path / ".mp_pipelines" / "dagster_home")) as instance:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
        return {r.event_log_entry.dagster_event.step_key for r in records}


def tree(spans: list[ReceivedSpan]) -> tuple[ReceivedSpan, list[ReceivedSpan], list[ReceivedSpan]]:
    """(run span, step spans, chat spans), checking each kind's parent."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 1, [s.name for s in roots]
    run = roots[0]
    steps = [s for s in spans if s.name.startswith("step ")]
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert len(spans) == 1 + len(steps) + len(chats), sorted(s.name for s in spans)
    for step in steps:
        assert step.parent_span_id == run.span_id, step.name
    for chat in chats:
        parent = by_id[chat.parent_span_id]
        assert parent in steps and parent.attributes["mp.task"] == chat.attributes["mp.task"], (chat.name, parent.name)
    return run, steps, chats


def test_a_run_of_research_report_is_one_trace_run_steps_calls(tmp_path: Path, openai_env: RunningServer) -> None:
    """One run → one trace (id = run id): run span → one span per step → one GenAI span per call; tokens and cost
    add up to `run --json` usage; v1.36 names by default, no prompt text, no API key anywhere."""
    with OTLPReceiver() as receiver:
        done = cli_run(tmp_path, ["run", "research_report", "-i", "topic=wind turbines", "-i", "max_questions=3",
                                  "--json"],
                       OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SERVICE_NAME="mp-test",
                       OPENAI_BASE_URL=openai_env.base_url, OPENAI_API_KEY=FAKE_KEY)
        assert done.returncode == 0, done.stderr[-3000:]
        outcome = json.loads(done.stdout)
        usage, run_id = outcome["usage"], outcome["run_id"]
        spans = receiver.wait_for(lambda s: any(not x.parent_span_id for x in s))
        input_tokens = receiver.metric("gen_ai.client.token.usage", **{"gen_ai.token.type": "input"})
        output_tokens = receiver.metric("gen_ai.client.token.usage", **{"gen_ai.token.type": "output"})
        calls = receiver.metric("mp.llm.calls")
    assert {s.trace_id for s in spans} == {trace_id_hex(run_id)}
    run, steps, chats = tree(spans)
    assert run.name == "run research_report" and run.attributes["mp.run_id"] == run_id
    assert {s.name for s in steps} == {f"step {key}" for key in step_keys(tmp_path, run_id)}
    assert len(chats) == usage["calls"] == len(openai_env.requests)
    assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats) == usage["prompt_tokens"]
    assert sum(c.attributes["gen_ai.usage.output_tokens"] for c in chats) == usage["completion_tokens"]
    assert sum(c.attributes["mp.cost_usd"] for c in chats) == pytest.approx(usage["cost_usd"], abs=1e-8)
    research = [c for c in chats if c.attributes["mp.task"] == "research"]
    assert len(research) == 3 and {c.attributes["mp.label"] for c in research} == {f"research[{i}]" for i in range(3)}
    for chat in chats:
        a = chat.attributes
        assert chat.name == "chat gpt-4o-mini"
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.system"] == "openai"
        assert a["gen_ai.request.model"] == "gpt-4o-mini" and a["gen_ai.response.model"]
        assert a["gen_ai.response.finish_reasons"] == ["stop"]
        assert "gen_ai.provider.name" not in a and not chat.events  # no content without MP_TRACE_CONTENT
    assert run.resource["service.name"] == "mp-test"
    assert FAKE_KEY not in repr(spans)
    assert (input_tokens, output_tokens, calls) == (usage["prompt_tokens"], usage["completion_tokens"], usage["calls"])


def test_step_processes_parent_their_spans_to_the_run_span(tmp_path: Path) -> None:
    """With the multiprocess executor every step runs in its own process: their spans still hang under the run
    span of the run worker, in the one trace of the run."""
    with OTLPReceiver() as receiver:
        done = cli_run(tmp_path, ["run", "research_report", "-i", "topic=tides", "-i", "max_questions=2", "--json",
                                  "--executor", "multiprocess"], OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        assert done.returncode == 0, done.stderr[-3000:]
        outcome = json.loads(done.stdout)
        spans = receiver.wait_for(lambda s: any(not x.parent_span_id for x in s)
                                  and len([x for x in s if x.name.startswith("chat ")]) >= outcome["usage"]["calls"])
    assert {s.trace_id for s in spans} == {trace_id_hex(outcome["run_id"])}
    _, steps, chats = tree(spans)
    assert {s.name for s in steps} == {f"step {key}" for key in step_keys(tmp_path, outcome["run_id"])}
    assert len(chats) == outcome["usage"]["calls"]
    assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats) == outcome["usage"]["prompt_tokens"]
    assert {c.attributes["gen_ai.system"] for c in chats} == {"simulated"}


TWO_TASKS = """
name: greetings
inputs:
  names: {type: list, default: [ada, grace, linus]}
defaults: {model: gpt-4o-mini, temperature: 0}
tasks:
  - name: greet
    for_each: inputs.names
    prompt: "Greet {{ item }} in five words."
  - name: summary
    prompt: "Summarise: {% for g in greet %}{{ g }} {% endfor %}"
"""


def test_latest_names_content_retries_and_cache_hits_on_spans(tmp_path: Path, instance: dg.DagsterInstance,
                                                              openai_env: RunningServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental switches to the latest names; MP_TRACE_CONTENT=1
    adds the prompt and answer; a 429 the client retried is an `mp.retry` event; a cache hit is a span too."""
    path = write_workflow(tmp_path, TWO_TASKS)
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http,gen_ai_latest_experimental")
        monkeypatch.setenv("MP_TRACE_CONTENT", "1")
        openai_env.faults.add("rate_limit", headers={"retry-after": "0.1"})
        first = run_file(path, {}, instance, executor="concurrent")
        second = run_file(path, {}, instance, executor="concurrent")  # temperature 0: read_write cache
        spans = receiver.wait_for(lambda s: len([x for x in s if not x.parent_span_id]) == 2)
        shutdown()  # this process's exporters stop while the receiver still answers
    assert first.success and second.success
    assert first.usage.calls == 4 and second.usage.cache_hits == 4 and second.usage.calls == 0
    chats = [s for s in spans if s.name.startswith("chat ")]
    first_chats = [c for c in chats if c.trace_id == trace_id_hex(first.run_id)]
    hits = [c for c in chats if c.trace_id == trace_id_hex(second.run_id)]
    assert len(first_chats) == 4 and len(hits) == 4
    for chat in first_chats:
        a = chat.attributes
        assert a["gen_ai.provider.name"] == "openai" and "gen_ai.system" not in a
        assert json.loads(a["gen_ai.input.messages"])[-1]["role"] == "user"
        assert json.loads(a["gen_ai.output.messages"])[0]["content"]
        assert "mp.cache_hit" not in a  # project counters appear when not 0 (or 1 for mp.calls)
    retried = [c for c in first_chats if c.attributes.get("mp.rate_limited")]
    assert len(retried) == 1 and retried[0].attributes["mp.http_attempts"] == 2
    assert [(name, attrs["http.response.status_code"]) for name, attrs in retried[0].events] == [("mp.retry", 429)]
    assert all(h.attributes["mp.cache_hit"] is True and h.attributes["gen_ai.usage.input_tokens"] == 0 for h in hits)
    assert FAKE_KEY not in repr(spans)


def test_no_endpoint_means_no_telemetry_and_no_opentelemetry_import(tmp_path: Path) -> None:
    """Without an endpoint (or with OTEL_SDK_DISABLED) telemetry is off: a whole run never imports OpenTelemetry."""
    assert active() is None
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    os.environ["OTEL_SDK_DISABLED"] = "true"
    try:
        assert active() is None
    finally:
        del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"], os.environ["OTEL_SDK_DISABLED"]
    probe = ("import sys, json; from mp_pipelines.cli.main import main\n"
             "try: main(['run', 'research_report', '-i', 'topic=x', '-i', 'max_questions=1', '--json'])\n"
             "except SystemExit as e: assert not e.code, e.code\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('opentelemetry', "
             "'prometheus_client'))})), file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_ENV and k != "DAGSTER_HOME"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, text=True, capture_output=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def test_json_log_lines_carry_run_step_usage_and_trace_id(tmp_path: Path) -> None:
    """MP_LOG_FORMAT=json: every Dagster log line is one JSON object with the run's ids and the call's figures."""
    done = cli_run(tmp_path, ["run", "research_report", "-i", "topic=x", "-i", "max_questions=2", "--json"],
                   MP_LOG_FORMAT="json")
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads(done.stdout)["run_id"]
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert lines and all(line["run_id"] == run_id and line["trace_id"] == trace_id_hex(run_id) for line in lines)
    assert all({"timestamp", "level", "job", "message"} <= set(line) for line in lines)
    plan = next(line for line in lines if line.get("step") == "research_report__plan")
    assert plan["task"] == "plan" and plan["model"] == "gpt-4o-mini" and plan["attempt"] == 1
    assert plan["prompt_tokens"] > 0 and plan["completion_tokens"] > 0 and plan["latency_s"] >= 0
    item = next(line for line in lines if line.get("step") == "research_report__research.research[1]")
    assert item["item_index"] == 1 and item["task"] == "research"
    text = cli_run(tmp_path, ["run", "research_report", "-i", "topic=x", "-i", "max_questions=2", "--json"],
                   MP_LOG_FORMAT="yaml")
    assert text.returncode == 2 and "MP_LOG_FORMAT='yaml' is not valid" in text.stderr


STATS_FANOUT = """
name: stats_fanout
inputs:
  names: {type: list, default: [a, b, c, d]}
defaults: {model: gpt-4o-mini, temperature: 0}
tasks:
  - name: greet
    for_each: inputs.names
    prompt: "Greet {{ item }}."
    on_item_failure: skip
"""


def test_stats_adds_up_known_runs(tmp_path: Path, instance: dg.DagsterInstance, openai_env: RunningServer,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs (the second answered from the cache), one item refused with HTTP 400, one 429 retried: `stats`
    reports exactly those figures per workflow, task, model and day, and writes an HTML report with charts."""
    path = write_workflow(tmp_path, STATS_FANOUT)
    openai_env.faults.add("rate_limit", headers={"retry-after": "0.1"}).add(status=400)
    first = run_file(path, {}, instance, executor="concurrent")
    second = run_file(path, {}, instance, executor="concurrent")
    assert first.usage.calls == 3 and second.usage.cache_hits == 3 and second.usage.calls == 1
    monkeypatch.setenv("DAGSTER_HOME", instance.root_directory)
    runner = CliRunner()
    result = runner.invoke(main, ["stats", "--by", "workflow", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    total = first.usage + second.usage
    assert row["workflow"] == "stats_fanout"
    assert (row["calls"], row["cache_hits"]) == (total.calls, total.cache_hits) == (4, 3)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (total.prompt_tokens, total.completion_tokens)
    assert row["cost_usd"] == pytest.approx(total.cost_usd, abs=1e-8)
    assert row["failures"] == 1  # the item refused with 400 in the first run; the second run answered it
    assert row["rate_limited"] == 1
    assert 0 < row["p50_latency_s"] <= row["p95_latency_s"]
    by_model = json.loads(runner.invoke(main, ["stats", "--by", "model", "--json"]).output)
    assert [(r["model"], r["calls"]) for r in by_model] == [("gpt-4o-mini", 4)]
    today = datetime.now(timezone.utc).date().isoformat()
    by_day = json.loads(runner.invoke(main, ["stats", "--by", "day", "--since", "24h", "--json"]).output)
    assert [(r["day"], r["calls"], r["cache_hits"]) for r in by_day] == [(today, 4, 3)]
    by_task = json.loads(runner.invoke(main, ["stats", "--by", "task", "--json"]).output)
    assert [(r["workflow"], r["task"], r["calls"]) for r in by_task] == [("stats_fanout", "greet", 4)]
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    assert json.loads(runner.invoke(main, ["stats", "--since", tomorrow, "--json"]).output) == []
    report = tmp_path / "report.html"
    text = runner.invoke(main, ["stats", "--html", str(report)])
    assert text.exit_code == 0 and "stats_fanout" in text.output
    page = report.read_text()
    for title in ("Cost per day", "Tokens by model", "Call latency distribution", "Cache hit rate"):
        assert title in page
    assert "Plotly.newPlot" in page and '<script src="http' not in page  # plotly.js inlined: one file
    bad = runner.invoke(main, ["stats", "--since", "last week"])
    assert bad.exit_code == 2 and "--since 'last week'" in bad.output


JUDGED = """
name: judged
inputs:
  notes: {type: list, default: [tea, coffee]}
tasks:
  - name: summary
    for_each: inputs.notes
    prompt: "Summarise: {{ item }}"
    checks: [{type: judge, rubric: "Is it a faithful summary?", min_score: 1}]
"""


def test_judge_calls_are_spans_of_the_checks_step_and_count_in_stats(tmp_path: Path, instance: dg.DagsterInstance,
                                                                      openai_env: RunningServer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A judge check's calls hang under the span of the task's checks step, like any step's calls, and `stats`
    counts them with the task's own calls (the run's summary keeps them apart as `checks_usage`)."""
    path = write_workflow(tmp_path, JUDGED)
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        outcome = run_file(path, {}, instance, executor="concurrent")
        spans = receiver.wait_for(lambda s: any(not x.parent_span_id for x in s)
                                  and len([x for x in s if x.name.startswith("chat ")]) >= 4)
        shutdown()
    assert outcome.success and outcome.usage.calls == 2
    judged = outcome.checks_usage
    assert judged is not None and judged.calls == 2
    _, steps, chats = tree(spans)
    checks_span = next(s for s in steps if s.name == "step judged__summary__checks")
    assert len([c for c in chats if c.parent_span_id == checks_span.span_id]) == 2 == len(chats) - 2
    (row,) = usage_rows(instance, since=None, by="task")
    assert (row["workflow"], row["task"], row["calls"]) == ("judged", "summary", 4)
    assert row["prompt_tokens"] == outcome.usage.prompt_tokens + judged.prompt_tokens
    assert row["cost_usd"] == pytest.approx(outcome.usage.cost_usd + judged.cost_usd, abs=1e-8)
    # A blocking check that fails after the judge scored: the step fails, its calls are still counted once; and a
    # task whose name ends in "_" (its checks step key: judged__summary___checks) keeps its name.
    failing = JUDGED.replace("name: judged", "name: judged_again").replace("name: summary", "name: summary_").replace(
        "min_score: 1}]", "min_score: 1}, {type: max_chars, value: 5, blocking: true}]").replace("tea, coffee", "mate, kvass")
    stopped = run_file(write_workflow(tmp_path, failing), {}, instance, executor="concurrent")
    assert not stopped.success and stopped.checks_usage is not None and stopped.checks_usage.calls == 2
    rows = {(r["workflow"], r["task"]): r["calls"] for r in usage_rows(instance, since=None, by="task")}
    assert rows == {("judged", "summary"): 4, ("judged_again", "summary_"): 2 + 2}


def test_since_and_percentiles() -> None:
    """--since forms, in UTC; nearest-rank percentiles."""
    now = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
    assert parse_since("7d", now) == datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    assert parse_since("24h", now) == datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=timezone.utc)
    values = [0.1 * i for i in range(1, 21)]
    assert percentile(values, 50) == pytest.approx(1.0) and percentile(values, 95) == pytest.approx(1.9)
    assert percentile([], 50) is None


def test_materializations_carry_numeric_usage_for_the_plots_tab(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Cost and tokens are numeric asset metadata (the Dagster UI plots numeric metadata per materialization)."""
    path = write_workflow(tmp_path, TWO_TASKS)
    outcome = run_file(path, {}, instance)
    events = materializations(instance, outcome.run_id)  # the task assets (the workflow inputs' asset has no usage)
    for event in events:
        for key in ("cost_usd", "prompt_tokens", "completion_tokens", "calls"):
            assert isinstance(event.metadata[key], (dg.FloatMetadataValue, dg.IntMetadataValue)), (key, event.metadata[key])
    assert len(events) == 2




def test_runs_reach_prometheus_through_the_pushgateway(tmp_path: Path, instance: dg.DagsterInstance,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Real `prometheus-pushgateway` and `prometheus`: after a run, PromQL returns its call and token totals;
    `sum(mp_llm_calls_total)` grows by the next run's calls; no series is labelled by run."""
    research = write_workflow(tmp_path, (Path(__file__).parents[1] / "mp_pipelines" / "workflows"
                                         / "research_report.yaml").read_text())
    with prometheus_with_pushgateway(tmp_path) as prometheus:
        monkeypatch.setenv("MP_PROMETHEUS_PUSHGATEWAY", prometheus.pushgateway)
        mine = f'instance="{instance_label()}"'  # this process's group
        assert prometheus.value(f"sum(mp_llm_calls_total{{{mine}}})") is None
        before = prometheus.value("sum(mp_llm_calls_total)") or 0
        first = run_file(research, {"topic": "tides", "max_questions": 2}, instance, executor="concurrent")
        assert first.success and first.usage.calls > 0
        prometheus.wait_value(f"sum(mp_llm_calls_total{{{mine}}})", first.usage.calls)
        prometheus.wait_value("sum(mp_llm_calls_total)", before + first.usage.calls)
        prometheus.wait_value(f'sum(mp_llm_tokens_total{{{mine},type="prompt"}})', first.usage.prompt_tokens)
        prometheus.wait_value(f'sum(mp_llm_tokens_total{{{mine},type="completion"}})', first.usage.completion_tokens)
        prometheus.wait_value(f"sum(mp_llm_call_duration_seconds_count{{{mine}}})", first.usage.calls)
        assert prometheus.value(f"sum(mp_llm_cost_usd_total{{{mine}}})") == pytest.approx(first.usage.cost_usd,
                                                                                           abs=1e-9)
        assert prometheus.value(f'sum(mp_llm_items_total{{{mine},task="research",status="success"}})') == 2
        second = run_file(research, {"topic": "waves", "max_questions": 3}, instance, executor="concurrent")
        prometheus.wait_value("sum(mp_llm_calls_total)", before + first.usage.calls + second.usage.calls)
        prometheus.wait_value(f'sum(mp_llm_calls_total{{{mine},task="research"}})', 5)
        series = prometheus.query(f"mp_llm_calls_total{{{mine}}}")
        shutdown()
    labels = {key for s in series for key in s["metric"]}
    assert labels == {"__name__", "job", "instance", "workflow", "task", "model", "provider"}
    assert {s["metric"]["job"] for s in series} == {"mp_pipelines"}
    assert {s["metric"]["instance"] for s in series} == {instance_label()}
    assert {s["metric"]["workflow"] for s in series} == {"research_report"}
    assert {s["metric"]["provider"] for s in series} == {"simulated"}


def test_the_instance_logging_config_writes_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs launched by a webserver or daemon log through the instance's `python_logs` handlers: with the
    formatter docs/observability.md shows, each line is JSON with the run id and its trace id."""
    handlers = {"json": {"class": "logging.StreamHandler", "level": "INFO", "stream": "ext://sys.stdout",
                         "formatter": "json"}}
    formatters = {"json": {"()": "mp_pipelines.telemetry.logs.JsonFormatter"}}
    overrides = {"telemetry": {"enabled": False}, "python_logs": {
        "python_log_level": "INFO", "dagster_handler_config": {"handlers": handlers, "formatters": formatters}}}
    path = write_workflow(tmp_path, TWO_TASKS)
    (tmp_path / "home").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "home"), overrides=overrides) as instance:
        outcome = run_file(path, {}, instance)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert outcome.success and lines
    assert {line["run_id"] for line in lines} == {outcome.run_id}
    assert {line["trace_id"] for line in lines} == {trace_id_hex(outcome.run_id)}
    summary = next(line for line in lines if line.get("step") == "greetings__summary" and "model" in line)
    assert summary["task"] == "summary" and summary["prompt_tokens"] > 0
    item = next(line for line in lines if line.get("step") == "greetings__greet.greet[2]")
    assert item["item_index"] == 2 and item["task"] == "greet" and item["job"] == "greetings"


BUDGETED = """
name: budgeted
inputs:
  names: {type: list, default: [a, b, c, d]}
defaults: {model: gpt-4o-mini, temperature: 0.5}
budget: {max_calls: 2}
breadth: 1
tasks:
  - name: greet
    for_each: inputs.names
    prompt: "Greet {{ item }}."
    on_item_failure: skip
"""


def test_budget_stops_are_span_events_and_stats_come_from_postgresql(tmp_path: Path, pg_instance: dg.DagsterInstance,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls the run's budget refuses are spans with an `mp.budget_stop` event and `error.type=budget`; the
    stats of a PostgreSQL instance count the answered calls (not the refused ones)."""
    path = write_workflow(tmp_path, BUDGETED)
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        outcome = run_file(path, {}, pg_instance, executor="concurrent")
        spans = receiver.wait_for(lambda s: any(not x.parent_span_id for x in s))
        stops = receiver.metric("mp.llm.budget_stops")
        shutdown()
    assert outcome.usage.calls == 2
    chats = [s for s in spans if s.name.startswith("chat ")]
    stopped = [c for c in chats if c.attributes.get("error.type") == "budget"]
    # items 2 and 3 are refused in their steps, and again when the collector retries what did not finish
    assert len(chats) - len(stopped) == 2 and len(stopped) >= 2 and stops == len(stopped)
    assert all([name for name, _ in c.events] == ["mp.budget_stop"] and c.status_code == 2 for c in stopped)
    (row,) = usage_rows(pg_instance, since=None, by="task")
    assert (row["workflow"], row["task"], row["calls"]) == ("budgeted", "greet", 2)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (outcome.usage.prompt_tokens,
                                                                outcome.usage.completion_tokens)
