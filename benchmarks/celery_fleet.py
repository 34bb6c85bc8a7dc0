"""A fan-out on a Celery worker fleet (real Redis, two `mp-pipelines worker` processes) against the in-process run.

Runs the same N-item fan-out in process, then on the fleet (`--executor celery`), against one loopback
OpenAI-compatible server that counts requests per item, and prints: wall time of each, requests per item, which
worker ran how many shards, the peak of calls in flight (≤ breadth), and whether the results are equal and in
input order. With `--kill`, one worker is drained and its pool process SIGKILLed mid-shard: the figures then
include the step that moved to the other worker and how many items were requested twice.

    python benchmarks/celery_fleet.py --n 2000 --latency 0.05 --breadth 16 [--kill]

Needs Redis on 127.0.0.1:6379 (`.ci/run` starts it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def workflow(n: int, breadth: int, shard: int) -> str:
    return (f"name: celery_bench\nbreadth: {breadth}\nmax_items: {n}\ninputs:\n  words: {{type: list, default: "
            f"{[f'w{i:04d}' for i in range(n)]}}}\ntasks:\n  - name: echo\n    for_each: inputs.words\n"
            f"    shard_size: {shard}\n    prompt: \"Echo {{{{ item }}}}\"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="items")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument("--breadth", type=int, default=16, help="calls in flight across the fleet")
    parser.add_argument("--shard", type=int, default=125, help="items per shard (step)")
    parser.add_argument("--kill", action="store_true", help="kill one worker's pool process mid-shard")
    args = parser.parse_args()

    import dagster as dg

    from mp_pipelines.cli.running import run_workflow
    from mp_pipelines.llm.simulated import SimulatedModel
    from mp_pipelines.spec.loader import load_workflow_file
    from mp_pipelines_tests.celery_fleet import (
        answered_at,
        celery_fleet,
        drain_and_kill_mid_shard,
        requests_per_item,
        step_workers,
    )
    from mp_pipelines_tests.fault_server import run_server

    with tempfile.TemporaryDirectory() as folder, run_server(model=SimulatedModel(latency=args.latency)) as server:
        tmp = Path(folder)
        path = tmp / "celery_bench.yaml"
        path.write_text(workflow(args.n, args.breadth, args.shard))
        (tmp / "steps").mkdir()
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-bench", "MP_STEP_STORAGE_DIR": str(tmp / "steps"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        os.environ.update(env)
        spec = load_workflow_file(path)
        figures: dict[str, object] = {"items": args.n, "breadth": args.breadth, "latency_s": args.latency}
        (tmp / "home_local").mkdir()
        with dg.DagsterInstance.local_temp(str(tmp / "home_local"), overrides={"telemetry": {"enabled": False}}) as local:
            started = time.perf_counter()
            expected = run_workflow(spec, {}, source=str(path), executor="in_process", instance=local)
            figures["in_process_s"] = round(time.perf_counter() - started, 1)
        assert expected.success, expected.as_text()
        server.reset()
        (tmp / "home").mkdir()
        with dg.DagsterInstance.local_temp(str(tmp / "home"), overrides={"telemetry": {"enabled": False}}) as instance, \
                celery_fleet(env, tmp) as fleet:
            os.environ["MP_CELERY_BROKER"] = fleet.broker
            outcome: list = []
            started = time.perf_counter()
            runner = threading.Thread(target=lambda: outcome.append(
                run_workflow(spec, {}, source=str(path), executor="celery", instance=instance)))
            runner.start()
            killed = drain_and_kill_mid_shard(instance, fleet, server) if args.kill else None
            runner.join()
            figures["celery_s"] = round(time.perf_counter() - started, 1)
            result = outcome[0]
            assert result.success, result.as_text()
            workers = step_workers(instance, result.run_id)
        counts = requests_per_item(server)
        shards = {step: hosts for step, hosts in workers.items() if step.startswith("echo[")}
        figures["shards_per_worker"] = dict(collections.Counter(h[-1].split("@")[0] for h in shards.values()))
        figures["results_equal_in_order"] = result.tasks["echo"]["output"] == expected.tasks["echo"]["output"]
        figures["items_answered"] = len(counts)
        figures["requests"] = sum(counts.values())
        figures["peak_in_flight"] = server.in_flight.peak
        if killed is not None:
            victim, step, before, killed_at = killed
            twice = sorted(item for item, n in counts.items() if n > 1)
            figures["killed"] = {"worker": victim.name, "step": step, "ran_on": workers[step],
                                 "requested_twice": len(twice),
                                 "twice_answered_before_kill_s": sorted(round(killed_at - answered_at(server, i), 3)
                                                                       for i in twice)}
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
