"""Fleet-wide limits: the shared stores (real Redis, real PostgreSQL, a SQLite file) and three `mp-pipelines run`
processes sharing one model's requests_per_minute against a loopback server that counts requests per second."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from mp_pipelines.calls.fleet import FleetLimits
from mp_pipelines.calls.fleet_stores import RedisLimits, SqlLimits, fleet_key
from mp_pipelines.calls.limits import CallLimiter
from mp_pipelines.llm.types import LimitSettings
from mp_pipelines_tests.celery_fleet import redis_url_or_skip
from mp_pipelines_tests.fault_server import RunningServer
from mp_pipelines_tests.postgres import postgres_storage_config, temporary_database

pytestmark = pytest.mark.timeout(300)


@contextmanager
def shared_store(kind: str, tmp_path: Path) -> Iterator[Any]:
    if kind == "redis":
        import redis

        url = redis_url_or_skip()
        yield RedisLimits(url)
        redis.Redis.from_url(url).flushdb()
    elif kind == "postgres":
        from mp_pipelines_tests.postgres import PG

        with temporary_database() as dbname:
            engine = sa.create_engine(f"postgresql://{PG['user']}:{PG['password']}@{PG['host']}:{PG['port']}/{dbname}")
            yield SqlLimits(engine)
            engine.dispose()
    else:
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'limits.sqlite'}", connect_args={"timeout": 30})
        yield SqlLimits(engine)
        engine.dispose()


STORES = ["redis", "postgres", "sqlite"]


@pytest.mark.parametrize("kind", STORES)
def test_reservations_are_spaced_and_a_pause_holds_every_turn_back(kind: str, tmp_path: Path) -> None:
    with shared_store(kind, tmp_path) as store:
        key = fleet_key("test", kind, str(time.time()))
        turns = [time.time() + store.reserve(key, 0.1, 0.0) for _ in range(5)]  # 600 per minute: one per 0.1 s
        assert turns[0] <= time.time() + 0.01
        assert [b - a for a, b in zip(turns, turns[1:])] == [pytest.approx(0.1, abs=0.01)] * 4
        store.pause(key, 2.0)
        assert 1.9 < store.paused_for(key) <= 2.0
        assert 1.9 < store.reserve(key, 0.1, 0.0) <= 2.0  # no turn before the pause ends
        store.pause(key, 0.5)  # a shorter pause does not cut a longer one short
        assert store.paused_for(key) > 1.8
        assert store.paused_for(fleet_key("never paused", kind)) == 0


@pytest.mark.parametrize("kind", STORES)
def test_in_flight_slots_are_capped_given_back_and_expire_unless_renewed(kind: str, tmp_path: Path) -> None:
    with shared_store(kind, tmp_path) as store:
        key = fleet_key("slots", kind, str(time.time()))
        assert store.enter(key, 2, "a:1", 30) and store.enter(key, 2, "b:1", 30)
        assert not store.enter(key, 2, "c:1", 30)
        store.leave(key, "a:1")
        assert store.enter(key, 2, "c:1", 30)
        other = fleet_key("short", kind, str(time.time()))
        assert store.enter(other, 1, "dead:1", 0.3) and not store.enter(other, 1, "live:1", 0.3)
        store.renew([(other, "dead:1")], 0.3)
        time.sleep(0.4)  # a holder that stops renewing (a killed process) loses its slot
        assert store.enter(other, 1, "live:1", 30)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_limiters_of_separate_processes_share_the_in_flight_cap(kind: str, tmp_path: Path) -> None:
    """Two limiters with their own FleetLimits (as two processes have) never exceed the shared max_in_flight."""
    with shared_store(kind, tmp_path) as store:
        settings = LimitSettings(max_in_flight=3)
        limiters = [CallLimiter(settings, FleetLimits(store), fleet_key("cap", kind, str(time.time())))
                    for _ in range(2)]
        limiters[1].fleet_key = limiters[0].fleet_key
        in_flight, peak = 0, 0

        async def call(limiter: CallLimiter) -> None:
            nonlocal in_flight, peak
            async with limiter.slot():
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.02)
                in_flight -= 1

        async def main() -> None:
            await asyncio.gather(*(call(limiters[i % 2]) for i in range(30)))

        asyncio.run(main())
        assert peak == 3


# ---- three processes, one model, requests_per_minute: 600 ------------------------------------------------

LIMIT_PER_MINUTE = 600
ITEMS_PER_PROCESS = 60


def _workflow(folder: Path, process: int, items: int) -> Path:
    path = folder / f"fleet_p{process}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"fleet_p{process}", "breadth": 16,
        "inputs": {"words": {"type": "list", "default": [f"p{process}-{i:04d}" for i in range(items)]}},
        "tasks": [{"name": "echo", "for_each": "inputs.words", "prompt": "Echo {{ item }}"}]}, sort_keys=False))
    return path


def run_three(tmp_path: Path, server: RunningServer, env: dict[str, str],
              items: int = ITEMS_PER_PROCESS) -> list[subprocess.CompletedProcess]:
    """Three `mp-pipelines run` processes at once; one 429 with Retry-After: 2 is injected mid-run."""
    full = {**os.environ, **env, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test-not-a-real-key",
            "MP_REQUESTS_PER_MINUTE": str(LIMIT_PER_MINUTE), "MP_FLEET_LIMITS": "on"}
    processes = [subprocess.Popen([sys.executable, "-m", "mp_pipelines.cli", "run", str(_workflow(tmp_path, p, items))],
                                  env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in range(3)]

    done = threading.Event()

    def inject() -> None:  # once all three are sending, the next request gets one 429 with Retry-After: 2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not done.is_set():
            senders = {str((r.body or {}).get("messages", [{}])[-1].get("content", ""))[5:7] for r in server.requests}
            if len(senders & {"p0", "p1", "p2"}) == 3:
                server.faults.add(status=429, headers={"retry-after": "2"})
                return
            done.wait(0.05)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=240 + items)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        # a process that failed early leaves the injector waiting: stop it, or it would inject its 429 into
        # whichever test uses the shared server next
        done.set()
        injector.join()
        for process in processes:
            if process.poll() is None:  # communicate timed out: no process outlives its test
                process.kill()
                process.communicate()
    return results


def check_fleet_rate_and_pause(server: RunningServer, results: list[subprocess.CompletedProcess],
                               items: int = ITEMS_PER_PROCESS) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    times = sorted(r.time for r in server.requests)
    assert len(times) == 3 * items + 1  # every item once, plus the retry of the throttled one
    throttled = [r.time for r in server.requests if r.fault is not None]
    assert len(throttled) == 1
    per_second = LIMIT_PER_MINUTE / 60
    # the total rate: over any 10 s, at most the limit's share + 5%, plus 2 for the turns at the window's edges
    # (turns are evenly spaced; a send leaves when its process's event loop gets to it, a little late on a busy
    # machine, so two turns can leave close together)
    for start in times:
        in_window = sum(start <= t < start + 10 for t in times)
        assert in_window <= 10 * per_second * 1.05 + 2, (start - times[0], in_window)
    # ... and the limit is what held the three back (alone, each would send its 60 items within a second)
    busy = times[-1] - times[0] - 2.0  # minus the pause
    assert len(times) / busy >= 0.8 * per_second, len(times) / busy
    # no 429 storm: after the 429, no process sends anything to the model for its Retry-After (2 s); 50 ms of
    # grace for a request already on its way when the 429 came back
    t429 = throttled[0]
    during = [round(t - t429, 3) for t in times if t429 + 0.05 < t < t429 + 2.0]
    assert during == [], during


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_three_processes_share_requests_per_minute_and_one_429_pauses_all(
        backend: str, tmp_path: Path, llm_server: RunningServer) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if backend == "redis":
        import redis

        env["MP_LIMITS_REDIS_URL"] = url = redis_url_or_skip()
        (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
        import dagster as dg

        with dg.DagsterInstance.from_config(str(home)) as instance:  # its SQLite tables, before three processes race
            instance.get_runs()
        try:
            results = run_three(tmp_path, llm_server, env)
        finally:
            redis.Redis.from_url(url).flushdb()
        check_fleet_rate_and_pause(llm_server, results)
    else:
        with temporary_database() as dbname:
            (home / "dagster.yaml").write_text(yaml.safe_dump(
                {"storage": postgres_storage_config(dbname), "telemetry": {"enabled": False}}))
            results = run_three(tmp_path, llm_server, env)
        check_fleet_rate_and_pause(llm_server, results)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_429_seen_by_one_limiter_pauses_the_limiter_of_another_process(kind: str, tmp_path: Path) -> None:
    """Limiters with their own FleetLimits (as in two processes): a 429 with Retry-After: 1 observed by one holds
    the other's next call back for that second, though the other never saw a 429."""
    with shared_store(kind, tmp_path) as store:
        key = fleet_key("pause", kind, str(time.time()))
        first, second = (CallLimiter(LimitSettings(), FleetLimits(store), key) for _ in range(2))

        async def main() -> float:
            async with first.slot():
                first.observe(429, {"retry-after": "1"})
            await asyncio.sleep(0.1)  # the pause is published from the store's threads
            started = time.monotonic()
            async with second.slot():
                return time.monotonic() - started

        waited = asyncio.run(main())
        assert 0.8 <= waited <= 1.5 and second.throttled == 0
