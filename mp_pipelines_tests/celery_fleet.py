"""Real Redis and real Celery workers (`mp-pipelines worker` subprocesses) for the fleet tests and benchmarks.

Redis must answer on 127.0.0.1:6379 (`.ci/run` starts it); without it the tests skip locally and fail under CI.
Each fleet uses a Redis database number of its own, chosen at random among 1–15, and flushes it afterwards,
so two test runs on one machine do not share a queue.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest

from mp_pipelines_tests.fault_server import RunningServer

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_url_or_skip(db: int | None = None) -> str:
    """redis://127.0.0.1:6379/<db> (a random free-ish database when None); skip (fail under CI) without Redis."""
    import redis

    db = random.randint(1, 15) if db is None else db
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT} under CI (.ci/run starts it): {exc}")
        pytest.skip(f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT}")
    return url


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    def pool_pids(self) -> list[int]:
        """The worker's pool processes (the children of its main process that run steps)."""
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@dataclass
class Fleet:
    broker: str
    workers: list[Worker] = field(default_factory=list)

    def by_host(self, hostname: str) -> Worker:
        return next(w for w in self.workers if hostname.startswith(f"{w.name}@"))


@contextmanager
def celery_fleet(env: dict[str, str], folder: Path, names: tuple[str, ...] = ("w1", "w2"),
                 concurrency: int = 1) -> Iterator[Fleet]:
    """Start `mp-pipelines worker` processes (one per name) with `env` (plus MP_CELERY_BROKER on a fresh Redis
    database), wait until each answers a ping, and stop them (and flush the database) on exit."""
    import redis
    from celery import Celery

    broker = redis_url_or_skip()
    redis.Redis.from_url(broker).flushdb()
    full_env = {**os.environ, **env, "MP_CELERY_BROKER": broker}
    fleet = Fleet(broker)
    try:
        for name in names:
            log = folder / f"{name}.log"
            process = subprocess.Popen(
                [sys.executable, "-m", "mp_pipelines.cli", "worker", "-n", name, "-c", str(concurrency),
                 "-l", "INFO"], env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                start_new_session=True)
            fleet.workers.append(Worker(name, process, log))
        app = Celery(broker=broker, backend=broker)
        deadline = time.monotonic() + 90
        while True:
            replies = app.control.ping(timeout=1.0) or []
            answered = {host.split("@")[0] for reply in replies for host in reply}
            if answered >= set(names):
                break
            dead = [w for w in fleet.workers if w.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name}\n{w.tail()}" for w in fleet.workers)
                raise RuntimeError(f"Celery workers did not start (answered: {sorted(answered)}):\n{logs}")
        yield fleet
    finally:
        for worker in fleet.workers:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGTERM)
        for worker in fleet.workers:
            try:
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(timeout=10)
        redis.Redis.from_url(broker).flushdb()


_ITEM = re.compile(r"Echo (w\d{4})")


def requests_per_item(server: RunningServer) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for request in list(server.requests):
        text = " ".join(str(m.get("content", "")) for m in (request.body or {}).get("messages", []))
        found = _ITEM.search(text)
        if found:
            counts[found.group(1)] += 1
    return counts


def step_workers(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[str]]:
    """Step key → the Celery workers that started it, in order (dagster-celery's "Executing steps" events)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
        event = record.event_log_entry.dagster_event
        metadata = event.engine_event_data.metadata if event and event.engine_event_data else {}
        worker = metadata.get("Celery worker")
        if worker is not None and event.step_key:
            found[event.step_key].append(str(worker.value))
    return found



def answered_at(server: RunningServer, item: str) -> float:
    """When the server first received the request of `item` (inf: never)."""
    for request in list(server.requests):
        text = " ".join(str(m.get("content", "")) for m in (request.body or {}).get("messages", []))
        if f"Echo {item}" in text:
            return request.time
    return float("inf")


def drain_and_kill_mid_shard(instance: dg.DagsterInstance, fleet: Fleet, server: RunningServer,
                             timeout: float = 120) -> tuple[Worker, str, collections.Counter[str], float]:
    """Wait for a shard step running on a worker with some items answered; stop that worker taking new steps
    (as when a machine is drained), SIGKILL its pool process. Returns (worker, step, requests per item before
    the kill, time of the kill)."""
    from celery import Celery

    victim, step = None, None
    deadline = time.monotonic() + timeout
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.2)
        for run in instance.get_runs():
            done = {r.event_log_entry.step_key for r in instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS).records}
            for key, hosts in step_workers(instance, run.run_id).items():
                if ".echo[" in key and key not in done and len(requests_per_item(server)) >= 10:
                    victim, step = fleet.by_host(hosts[-1]), key
                    break
            if victim:
                break
    if victim is None or step is None:
        raise AssertionError("no shard started on a worker")
    app = Celery(broker=fleet.broker, backend=fleet.broker)
    replies = app.control.ping(timeout=1.0) or []
    names = [host for reply in replies for host in reply if host.startswith(f"{victim.name}@")]
    app.control.cancel_consumer("dagster", destination=names, reply=True, timeout=5)
    before = requests_per_item(server)
    (pool_pid,) = victim.pool_pids()
    os.kill(pool_pid, signal.SIGKILL)
    return victim, step, before, time.time()
