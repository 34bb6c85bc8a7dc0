"""Cache, cost, budgets, JSON repair and failure policies, through real jobs against a loopback endpoint."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from mp_pipelines.calls.pricing import DEFAULT_PRICES, PriceFileError, load_prices
from mp_pipelines.calls.store import RESPONSES, ResponseStore, store_for
from mp_pipelines.cli.main import main
from mp_pipelines.spec.loader import WorkflowValidationError, parse_workflow
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.workflow_helpers import fan_workflow, materializations, run_file, write_workflow

CHAIN = """
name: chain
defaults: {{model: gpt-4o-mini, temperature: 0}}
{extra}
tasks:
  - name: facts
    prompt: "List facts about {{{{ 'owls' }}}}"
  - name: summary
    depends_on: [facts]
    prompt: "{summary_prompt} {{{{ facts }}}}"
  - name: title
    depends_on: [summary]
    prompt: "Title for {{{{ summary }}}}"
  - name: aside
    prompt: "An unrelated aside"
"""


def chain(summary_prompt: str = "Summarise:", extra: str = "") -> str:
    return CHAIN.format(summary_prompt=summary_prompt, extra=extra)


def user_prompts(server: RunningServer) -> list[str]:
    """The last user message of every chat request the server received, in arrival order."""
    return [r.body["messages"][-1]["content"] for r in server.requests if isinstance(r.body, dict)]


def settled_request_count(server: RunningServer, quiet: float = 0.1, timeout: float = 30.0) -> int:
    """The length of the server's request log once it has settled: no chat request in flight and no new entry for
    `quiet` s (a request is logged when the server starts answering it, and in flight until it has answered)."""
    deadline = time.monotonic() + timeout
    count, since = len(server.requests), time.monotonic()
    while True:
        now = time.monotonic()
        if server.in_flight.current or len(server.requests) != count:
            count, since = len(server.requests), now
        elif now - since >= quiet:
            return count
        assert now < deadline, (f"the server's request log did not settle within {timeout:g} s: "
                                f"{server.in_flight.current} request(s) in flight, {len(server.requests)} logged")
        time.sleep(0.01)


def test_rerun_makes_no_calls_and_a_changed_prompt_recalls_only_its_task_and_dependents(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    first = run_file(write_workflow(tmp_path, chain()), {}, instance)
    assert first.success and first.usage.calls == 4 and first.usage.cache_hits == 0
    assert len(openai_env.requests) == 4

    second = run_file(write_workflow(tmp_path, chain()), {}, instance)
    assert second.success and second.usage.calls == 0 and second.usage.cache_hits == 4
    assert len(openai_env.requests) == 4, "an unchanged workflow must not call the model again"
    assert {n: t["output"] for n, t in second.tasks.items()} == {n: t["output"] for n, t in first.tasks.items()}
    hits = {e.asset_key.path[-1]: e.metadata["cache_hits"].value for e in materializations(instance, second.run_id)}
    assert hits == {"facts": 1, "summary": 1, "title": 1, "aside": 1}

    third = run_file(write_workflow(tmp_path, chain("Condense:")), {}, instance)
    assert third.success and third.usage.calls == 2 and third.usage.cache_hits == 2
    new = user_prompts(openai_env)[4:]
    assert len(new) == 2 and new[0].startswith("Condense:") and new[1].startswith("Title for")


@pytest.mark.parametrize("policy, calls_on_rerun, rows", [("off", 4, 0), ("read", 4, 0), ("write", 4, 4)])
def test_cache_policies(policy: str, calls_on_rerun: int, rows: int, openai_env: RunningServer,
                        instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, chain(extra=f"cache: {policy}"))
    assert run_file(path, {}, instance).usage.calls == 4
    again = run_file(path, {}, instance)
    assert again.success and again.usage.calls == calls_on_rerun and again.usage.cache_hits == 4 - calls_on_rerun
    store = store_for(instance)
    assert store is not None and store.count("") == rows


def test_temperature_above_zero_defaults_to_no_cache_and_a_task_can_opt_in(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    text = chain().replace("temperature: 0", "temperature: 0.7").replace(
        '    prompt: "An unrelated aside"', '    prompt: "An unrelated aside"\n    cache: read_write')
    path = write_workflow(tmp_path, text)
    run_file(path, {}, instance)
    again = run_file(path, {}, instance)
    assert again.usage.calls == 3 and again.usage.cache_hits == 1
    assert again.tasks["aside"]["usage"].cache_hits == 1


def test_identical_calls_in_flight_are_paid_once(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                 tmp_path: Path) -> None:
    """The same prompt twice in a fan-out at temperature 0: the second waits for the first's answer (counted
    as a cache hit) instead of paying again; with `cache: off` every item is called."""
    words = ["alpha", "beta", "alpha", "alpha", "gamma", "beta"]
    openai_env.faults.add(delay=0.5, times=3)  # the first calls are still in flight when their twins start
    spec = fan("twins", 6, breadth=6, words=words, task_extra="\n    shard_size: 6").replace("cache: off\n", "")
    outcome = run_file(write_workflow(tmp_path, spec), {}, instance, executor=None)  # one shard: all at once
    assert outcome.success, outcome.as_text()
    echoed = [p for p in user_prompts(openai_env) if p.startswith("Echo")]
    assert sorted(echoed) == ["Echo alpha", "Echo beta", "Echo gamma"]
    assert [o.split("Echo ")[-1].split()[0].strip(".:") for o in outcome.tasks["echo"]["output"]] == words
    assert outcome.usage.calls == 3 + 1 and outcome.usage.cache_hits == 3  # + `joined`

    openai_env.reset()
    (tmp_path / "off").mkdir()
    spec = fan("twins_off", 6, breadth=6, words=words, task_extra="\n    shard_size: 6")
    off = run_file(write_workflow(tmp_path / "off", spec), {}, instance, executor=None)
    assert off.success and sorted(p for p in user_prompts(openai_env) if p.startswith("Echo")) == sorted(
        f"Echo {w}" for w in words)


def test_a_twin_whose_first_call_fails_makes_its_own(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                     tmp_path: Path) -> None:
    """A failed call's error is its own: the identical call that waited for it asks the model itself."""
    spec = fan("twins_fail", 2, breadth=2, words=["alpha", "alpha"], extra="on_item_failure: skip",
               task_extra="\n    shard_size: 2").replace("cache: off\n", "")
    openai_env.faults.add(status=400, delay=0.5)  # a bad request is not retried by the client
    outcome = run_file(write_workflow(tmp_path, spec), {}, instance, executor=None)
    assert outcome.success, outcome.as_text()
    assert [p for p in user_prompts(openai_env) if p.startswith("Echo")] == ["Echo alpha", "Echo alpha"]
    (failed,) = outcome.tasks["echo"]["failed_items"]
    assert failed["error_kind"] == "bad_request"
    assert len(outcome.tasks["echo"]["output"]) == 1 and "alpha" in outcome.tasks["echo"]["output"][0]


def test_cache_cli_stats_and_clear(openai_env: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    for name in ("alpha", "beta"):
        # Entries are content-addressed: each workflow asks different things, so neither reuses the other's.
        text = chain().replace("name: chain", f"name: {name}").replace("owls", name)
        text = text.replace("unrelated aside", f"aside on {name}")
        path = write_workflow(tmp_path, text)
        result = cli.invoke(main, ["run", str(path), "--json"])
        assert result.exit_code == 0, result.output
    rerun = cli.invoke(main, ["run", str(tmp_path / "alpha.yaml"), "--json"])
    usage = json.loads(rerun.stdout)["usage"]
    assert usage["calls"] == 0 and usage["cache_hits"] == 4 and usage["cost_usd"] == 0

    stats = json.loads(cli.invoke(main, ["cache", "stats", "--json"]).stdout)
    assert stats["entries"] == 8 and stats["hits"] == 4 and stats["saved_usd"] > 0
    assert {(g["workflow"], g["entries"]) for g in stats["groups"]} == {("alpha", 4), ("beta", 4)}

    store_url = stats["url"].split("'")[1]
    with sa.create_engine(store_url).begin() as conn:  # age beta's rows by ten days
        conn.execute(RESPONSES.update().where(RESPONSES.c.workflow == "beta")
                     .values(created_at=time.time() - 10 * 86_400))
    assert "removed 0 cache entries" in cli.invoke(main, ["cache", "clear", "--older-than", "30"]).output
    assert "removed 4 cache entries" in cli.invoke(main, ["cache", "clear", "--older-than", "5"]).output
    assert "removed 4 cache entries" in cli.invoke(main, ["cache", "clear", "--workflow", "alpha"]).output
    assert json.loads(cli.invoke(main, ["cache", "stats", "--json"]).stdout)["entries"] == 0
    bad = cli.invoke(main, ["cache", "clear", "--older-than", "-1"])
    assert bad.exit_code == 2 and "--older-than" in bad.output


def test_cache_lives_in_postgresql_when_the_instance_does(openai_env: RunningServer, pg_instance: dg.DagsterInstance,
                                                          tmp_path: Path) -> None:
    store = store_for(pg_instance)
    assert store is not None and store.engine.dialect.name == "postgresql"
    path = write_workflow(tmp_path, chain())
    assert run_file(path, {}, pg_instance).usage.calls == 4
    again = run_file(path, {}, pg_instance, executor="multiprocess")  # other processes read the same table
    assert again.success and again.usage.calls == 0 and again.usage.cache_hits == 4
    assert store.count("") == 4


def test_multiprocess_steps_see_the_environment_their_run_starts_in(
        llm_server_factory, instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step processes fork from a forkserver that a process starts once. When the process names an endpoint after
    a run on the simulated model, its next run's steps call that endpoint (not the simulated model, whose answers
    are cached under another endpoint), as the run reports."""
    path = write_workflow(tmp_path, chain())
    first = run_file(path, {}, instance, executor="multiprocess")
    assert first.success and first.provider == "simulated"
    server = llm_server_factory()  # an endpoint no earlier forkserver can have been started with
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    second = run_file(path, {}, instance, executor="multiprocess")
    assert second.success and second.provider == "openai"
    assert second.usage.calls == 4 and second.usage.cache_hits == 0 and len(server.requests) == 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_opening_a_new_store_at_once_all_get_it(backend: str, tmp_path: Path) -> None:
    """Every step of a first run opens the store at about the same moment. Creating the tables raced ("already
    exists", and SQLite's immediate "database is locked" while another connection switched the file to WAL), and
    a step that lost the race ran without checkpoints, so a resumed run found neither its answers nor its calls.
    8 processes must all open it: 20 fresh SQLite files (about one in four failed before), 4 fresh PostgreSQL
    databases."""
    import multiprocessing

    from mp_pipelines_tests.postgres import PG, temporary_database
    from mp_pipelines_tests.store_opening import open_store_and_count

    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(8) as pool:
        start = manager.Barrier(8)  # each of the 8 workers holds one task until all 8 have one
        for round_ in range(20 if backend == "sqlite" else 4):
            with contextlib.ExitStack() as stack:
                if backend == "sqlite":
                    url = f"sqlite:///{tmp_path / f'store{round_}.sqlite'}"
                else:
                    name = stack.enter_context(temporary_database())
                    url = f"postgresql://{PG['user']}:{PG['password']}@{PG['host']}:{PG['port']}/{name}"
                assert pool.starmap(open_store_and_count, [(url, start)] * 8, chunksize=1) == [None] * 8


def test_lookups_asked_together_are_one_database_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fan-out's items look up their answers in the same loop turn: they reach the database as one batch
    (no thread hop and query per item), each gets its own answer or None, and a failing database is a miss."""
    import asyncio

    from mp_pipelines.calls.store import Entry
    from mp_pipelines.llm.client import LLMResult

    store = ResponseStore(f"sqlite:///{tmp_path / 'lookups.sqlite'}")
    for scope, key in (("", "k1"), ("", "k7"), ("run-1", "k1")):
        result = LLMResult(text=f"{scope or 'shared'}/{key}", parsed=None, model="gpt-4o-mini", provider="openai",
                           prompt_tokens=3, completion_tokens=2, latency_s=0.1, finish_reason="stop", attempts=1)
        store.put(Entry(scope, key, "wf", "t", result))
    assert store.flush()
    batches: list[int] = []
    get_many = store.get_many

    def counted(wanted: list) -> dict:
        batches.append(len(wanted))
        return get_many(wanted)

    store.get_many = counted  # type: ignore[method-assign]
    wanted = [("", f"k{i}") for i in range(40)] + [("run-1", f"k{i}") for i in range(10)]

    async def look_up_all() -> list:
        return await asyncio.gather(*(store.aget(scope, key) for scope, key in wanted))

    found = asyncio.run(look_up_all())
    assert batches == [50]
    texts = {pair: answer.text for pair, answer in zip(wanted, found) if answer is not None}
    assert texts == {("", "k1"): "shared/k1", ("", "k7"): "shared/k7", ("run-1", "k1"): "run-1/k1"}
    assert all(answer.cached and answer.cost_usd >= 0 for answer in found if answer is not None)
    assert store.stats()["hits"] == 3

    def broken(wanted: list) -> dict:
        raise sa.exc.OperationalError("SELECT", {}, Exception("disk I/O error"))

    store.get_many = broken  # type: ignore[method-assign]
    assert asyncio.run(look_up_all()) == [None] * 50
    assert "LLM cache lookup" in caplog.text and "disk I/O error" in caplog.text


def test_cost_follows_the_price_table_and_a_price_file_overrides_it(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_workflow(tmp_path, chain(extra="cache: off"))
    outcome = run_file(path, {}, instance)
    price_in, price_out = DEFAULT_PRICES["gpt-4o-mini"]
    usage = outcome.usage
    expected = (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6
    assert usage.cost_usd == pytest.approx(expected, rel=1e-3) and usage.cost_usd > 0
    assert outcome.as_json()["usage"]["cost_usd"] == pytest.approx(expected, rel=1e-3)
    costs = {e.asset_key.path[-1]: e.metadata["cost_usd"].value for e in materializations(instance, outcome.run_id)}
    assert sum(costs.values()) == pytest.approx(expected, rel=1e-3)

    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-4o-mini: {input: 1000, output: 0}\n")
    monkeypatch.setenv("MP_PRICES_FILE", str(prices))
    pricier = run_file(path, {}, instance)  # read when a call is priced: no restart needed
    assert pricier.usage.cost_usd == pytest.approx(pricier.usage.prompt_tokens * 1000 / 1e6)


def test_price_table_matches_prefixes_and_rejects_bad_files(tmp_path: Path) -> None:
    table = load_prices()
    assert table.price_of("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert table.price_of("gpt-4o-2024-08-06") == DEFAULT_PRICES["gpt-4o"]
    assert table.price_of("gpt-4.1-mini-latest") == DEFAULT_PRICES["gpt-4.1-mini"]
    assert table.price_of("o1-pro") is None and table.price_of("gpt-5-pro") is None, "other models, other prices"
    assert table.cost("house-llama", 1000, 1000) == 0.0
    bad = tmp_path / "prices.yaml"
    bad.write_text("my-model: {input: -1, output: 2}\n")
    with pytest.raises(PriceFileError, match=r"prices.yaml: model 'my-model' field input must be a number ≥ 0"):
        load_prices(bad)
    bad.write_text("my-model: {in: 1}\n")
    with pytest.raises(PriceFileError, match="needs exactly the keys input and output"):
        load_prices(bad)


JOINED = """  - name: joined
    depends_on: [echo]
    prompt: "Join {{ echo | length }} answers"
"""


def fan(name: str, items: int, *, breadth: int = 4, extra: str = "", task_extra: str = "",
        words: list | None = None) -> str:
    words = words if words is not None else [f"w{i:03d}" for i in range(items)]
    return fan_workflow(name, words, breadth=breadth, defaults="{temperature: 0}", extra=extra,
                        task_extra=task_extra, more_tasks=JOINED)


def test_call_budget_stops_new_calls_keeps_results_and_says_which_budget(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, fan("budgeted", 40, breadth=4, extra="budget: {max_calls: 10}"))
    outcome = run_file(path, {}, instance, executor=None)  # the default concurrent executor, 2 shards of 20
    assert not outcome.success
    assert len(openai_env.requests) == 10, "max_calls is exact: no call starts once 10 have started"
    error = outcome.tasks["echo"]["error"]
    assert "max_calls of 10 reached: 10 call(s) started" in error and "30 of 40 item(s) not run" in error
    assert outcome.tasks["joined"]["status"] == "not_run"
    (partial,) = [e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "echo"]
    assert partial.metadata["complete"].value is False and partial.metadata["stopped_items"].value == 30
    assert partial.metadata["calls"].value == 10

    # The run config overrides the workflow's budget; resuming with more budget runs only the 30 stopped items.
    from mp_pipelines.cli.running import resume_run

    resumed = resume_run(outcome.run_id, instance=instance, budget={"max_calls": 100})
    assert resumed.success, resumed.as_text()
    assert len(openai_env.requests) == 10 + 30 + 1  # the 30 stopped items, then `joined`
    echoed = [p.removeprefix("Echo ") for p in user_prompts(openai_env) if p.startswith("Echo")]
    assert sorted(echoed) == [f"w{i:03d}" for i in range(40)], "every item called exactly once over both runs"
    assert [r.split("Echo ")[-1][:4] for r in resumed.tasks["echo"]["output"]] == [f"w{i:03d}" for i in range(40)]


def test_cost_budget_overshoot_is_bounded_by_calls_in_flight(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, fan("costly", 30, breadth=3, extra="budget: {max_cost_usd: 0.00005}"))
    outcome = run_file(path, {}, instance, executor=None)
    assert not outcome.success
    assert "max_cost_usd of $0.00005 reached: $0.0000" in outcome.tasks["echo"]["error"]
    calls = len(openai_env.requests)
    per_call = outcome.usage.cost_usd / max(outcome.usage.calls, 1)
    assert 0 < calls < 30
    assert outcome.usage.cost_usd - 0.00005 <= 3 * per_call + 1e-12, "overshoot ≤ the calls in flight (breadth 3)"


def test_call_budget_is_shared_by_step_processes(llm_server_factory, monkeypatch: pytest.MonkeyPatch,
                                                 instance: dg.DagsterInstance, tmp_path: Path) -> None:
    """Two shards in two processes (multiprocess executor) draw on one account in the instance's database."""
    from mp_pipelines.cli.running import run_config
    from mp_pipelines.definitions import reconstructable_job
    from mp_pipelines.llm.simulated import SimulatedModel
    from mp_pipelines.spec.loader import load_workflow_file

    server = llm_server_factory(model=SimulatedModel(latency=0.2))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-budget")
    path = write_workflow(tmp_path, fan("spread_budget", 40, breadth=8, extra="budget: {max_calls: 10}",
                                        task_extra="\n    shard_size: 20"))
    config = run_config({}, None)
    config["execution"] = {"config": {"multiprocess": {}}}
    with dg.execute_job(reconstructable_job(load_workflow_file(path), str(path)), instance=instance,
                        run_config=config) as result:
        assert not result.success
    assert len(server.requests) == 10, "max_calls holds across processes"


def test_re_executing_all_steps_asks_the_model_again(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                    tmp_path: Path) -> None:
    """Only a from-failure re-execution (a resume) takes its family's stored answers; a full one samples anew."""
    from mp_pipelines.definitions import reconstructable_job
    from mp_pipelines.spec.loader import load_workflow_file

    path = write_workflow(tmp_path, chain().replace("temperature: 0", "temperature: 0.9"))  # cache off
    first = run_file(path, {}, instance)
    job = reconstructable_job(load_workflow_file(path), str(path))
    options = dg.ReexecutionOptions(parent_run_id=first.run_id, step_selection=["*chain__title", "chain__aside"])  # every step
    with dg.execute_job(job, instance=instance, reexecution_options=options,
                        run_config=instance.get_run_by_id(first.run_id).run_config) as result:
        assert result.success
    assert len(openai_env.requests) == 8


def test_budget_in_run_config_is_validated() -> None:
    with pytest.raises(WorkflowValidationError, match=r"budget\.max_calls"):
        parse_workflow({"name": "w", "budget": {"max_calls": 0}, "tasks": [{"name": "t", "prompt": "p"}]})
    with pytest.raises(WorkflowValidationError, match=r"budget\.max_dollars"):
        parse_workflow({"name": "w", "budget": {"max_dollars": 1}, "tasks": [{"name": "t", "prompt": "p"}]})


SCHEMA_TASK = """
name: typed
cache: off
tasks:
  - name: person
    prompt: "Describe a person as JSON"
    output: json
    output_schema:
      type: object
      required: [name, age]
      properties: {name: {type: string}, age: {type: integer}}
"""


def test_invalid_json_is_sent_back_with_the_validation_error_and_repaired(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    openai_env.faults.add(content="Sure! Here it is: {name: Ada")
    openai_env.faults.add(content='{"name": "Ada", "age": "thirty-six"}')
    openai_env.faults.add(content='{"name": "Ada", "age": 36}')
    outcome = run_file(write_workflow(tmp_path, SCHEMA_TASK), {}, instance)
    assert outcome.success, outcome.as_text()
    assert outcome.tasks["person"]["output"] == {"name": "Ada", "age": 36}
    assert outcome.usage.calls == 3, "the two unusable answers were paid for and are counted"
    first, second, third = (r.body for r in openai_env.requests)
    assert first["response_format"]["type"] == "json_schema", "the endpoint's structured output is asked for"
    assert second["messages"][-2] == {"role": "assistant", "content": "Sure! Here it is: {name: Ada"}
    assert "not valid JSON" in second["messages"][-1]["content"]
    assert "does not match the JSON schema: 'thirty-six' is not of type 'integer' at $.age" in third["messages"][-1]["content"]


def test_an_answer_that_stays_invalid_fails_its_item_with_the_raw_answer(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    text = fan("stubborn", 3, breadth=1, extra="on_item_failure: skip",
               task_extra="\n    output: json\n    repair_attempts: 1")
    openai_env.faults.add(content="not json at all", times=2)  # the first item: its answer and its one repair
    outcome = run_file(write_workflow(tmp_path, text), {}, instance, executor="in_process")
    assert outcome.success, outcome.as_text()
    (failed,) = outcome.tasks["echo"]["failed_items"]
    assert failed["index"] == 0 and failed["error_kind"] == "invalid_output" and failed["attempts"] == 1
    assert failed["raw_output"] == "not json at all" and "not valid JSON" in failed["error"]
    assert len(outcome.tasks["echo"]["output"]) == 2


def test_skip_policy_lists_failures_and_downstream_runs_on_successes(
        openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    words = [{"t": f"w{i}"} if i % 4 else {"other": i} for i in range(12)]  # every 4th item lacks `t`
    text = fan("lenient", 0, extra="on_item_failure: skip", words=words).replace("Echo {{ item }}", "Echo {{ item.t }}")
    outcome = run_file(write_workflow(tmp_path, text), {}, instance, executor=None)
    assert outcome.success, outcome.as_text()
    failed = outcome.tasks["echo"]["failed_items"]
    assert [f["index"] for f in failed] == [0, 4, 8] and all("'dict object' has no attribute 't'" in f["error"]
                                                              for f in failed)
    assert [o.split("Echo ")[-1][:2] for o in outcome.tasks["echo"]["output"]] == [
        f"w{i}"[:2] for i in range(12) if i % 4]
    assert "Join 9 answers" in user_prompts(openai_env)[-1], "downstream sees only the successes"
    (event,) = [e for e in materializations(instance, outcome.run_id) if e.asset_key.path[-1] == "echo"]
    assert event.metadata["failed_items"].value == 3
    assert [f["index"] for f in event.metadata["failed"].value] == [0, 4, 8]

    strict = write_workflow(tmp_path, text.replace("name: lenient", "name: strict").replace(
        "on_item_failure: skip", "on_item_failure: skip\nmin_success_ratio: 0.8"))
    below = run_file(strict, {}, instance)
    assert not below.success
    assert "9 of 12 item(s) succeeded (75%), below its min_success_ratio of 80%" in below.tasks["echo"]["error"]


def test_fail_policy_still_fails_the_task(openai_env: RunningServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    words = [{"t": "a"}, {"other": 1}]
    text = fan("strict_default", 0, words=words).replace("Echo {{ item }}", "Echo {{ item.t }}")
    outcome = run_file(write_workflow(tmp_path, text), {}, instance)
    assert not outcome.success and "'dict object' has no attribute 't'" in outcome.tasks["echo"]["error"]


def test_failure_policy_fields_only_apply_to_fan_outs() -> None:
    with pytest.raises(WorkflowValidationError, match="on_item_failure is set but the task has no for_each"):
        parse_workflow({"name": "w", "tasks": [{"name": "t", "prompt": "p", "on_item_failure": "skip"}]})
    with pytest.raises(WorkflowValidationError, match="min_success_ratio"):
        parse_workflow({"name": "w", "min_success_ratio": 1.5, "tasks": [{"name": "t", "prompt": "p"}]})


def test_resume_after_sigkill_mid_fan_out_calls_only_what_was_not_answered(
        llm_server_factory, tmp_path: Path) -> None:
    """Kill the run process (SIGKILL) mid-way through a 200-item fan-out, resume it, and check that every item
    appears exactly once and that no answer the killed run had stored is paid for again."""
    import os
    import signal
    import subprocess
    import sys

    from mp_pipelines.calls.store import CACHE_FILE
    from mp_pipelines.cli.running import resume_run
    from mp_pipelines.llm.simulated import SimulatedModel

    server = llm_server_factory(model=SimulatedModel(latency=0.25))
    path = write_workflow(tmp_path, fan("killed", 200, breadth=6).replace("cache: off\n", ""))  # temperature 0 …
    path.write_text(path.read_text().replace("defaults: {temperature: 0}", "defaults: {temperature: 0.9}"))  # … off
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test-resume"}
    env.pop("DAGSTER_HOME", None)
    child = subprocess.Popen([sys.executable, "-m", "mp_pipelines.cli", "run", str(path), "--json"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    home = tmp_path / ".mp_pipelines" / "dagster_home"
    deadline = time.monotonic() + 120
    stored = 0
    while stored < 60:
        assert child.poll() is None, f"the run ended before it was killed: {child.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the run stored no 60 answers within 120 s"
        time.sleep(0.05)
        if (home / CACHE_FILE).exists():
            stored = ResponseStore(f"sqlite:///{home / CACHE_FILE}").count()
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    before = settled_request_count(server)  # the requests the dead process had in flight are in the log by now
    store = ResponseStore(f"sqlite:///{home / CACHE_FILE}")
    with store.engine.connect() as conn:
        answers = [row.answer for row in conn.execute(sa.text("SELECT answer FROM mp_llm_responses"))]
    kept = {re.search(r"Echo (w\d{3})", answer).group(1) for answer in answers}
    checkpointed = len(answers)
    assert 60 <= checkpointed < 200 and len(kept) == checkpointed
    assert len(server.requests) == before, "a request of the killed run reached the server after its log had settled"

    with dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}}) as instance:
        (killed,) = instance.get_runs()
        assert killed.status == dg.DagsterRunStatus.STARTED  # nobody could report its death
        monkey_env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test-resume"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in monkey_env.items():
                mp.setenv(key, value)
            mp.chdir(tmp_path)
            outcome = resume_run(killed.run_id, instance=instance, force=True)
        assert outcome.success, outcome.as_text()
        resumed = instance.get_run_by_id(outcome.run_id)
        assert resumed.parent_run_id == killed.run_id
        steps = {run: sorted({(e.step_key, e.dagster_event_type.value) for e in instance.all_logs(run)
                                      if e.is_dagster_event and e.step_key and e.dagster_event_type.value in
                                      ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")})
                         for run in (killed.run_id, resumed.run_id)}
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE

    after = [p for p in user_prompts(server)[before:] if p.startswith("Echo")]
    called = {p.removeprefix("Echo ") for p in after}
    neither = sorted({f"w{i:03d}" for i in range(200)} - called - kept)
    assert len(after) == len(set(after)) == 200 - checkpointed, (
        f"only items without a stored answer were called; neither called nor stored: {neither}; "
        f"called though stored: {sorted(called & kept)}; {steps}")
    assert outcome.usage.calls == len(after) + 1 and outcome.usage.cache_hits >= 1  # + `joined`
    echoed = [o.split("Echo ")[-1][:4] for o in outcome.tasks["echo"]["output"]]
    assert echoed == [f"w{i:03d}" for i in range(200)], "every item exactly once, in input order"
