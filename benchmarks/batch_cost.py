"""Cost online vs batch mode for the same fan-out, and the CPU a run spends while it waits for its batch.

The simulated model is served over HTTP by `mp-pipelines serve-model` in another process (its Batch API
included). The same N-item workflow (gpt-4o-mini prices) runs online, then in batch mode; the answers must match
item for item. Then a smaller batch run (--wait-items) is made twice, against a server whose batches complete at
once and one whose batches take --wait seconds: the extra CPU of the second is what waiting cost (polls every
MP_BATCH_POLL_SECONDS).

Usage: python benchmarks/batch_cost.py [--n 10000] [--wait 60] [--poll 5] [--wait-items 200]
The last line is `batch_share=X cpu_while_waiting_s=Y` (X: batch cost / online cost).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(batch_seconds: float) -> tuple[subprocess.Popen, str]:
    """The simulated model over HTTP in its own process, its batches completing after `batch_seconds`."""
    port = free_port()
    env = {**os.environ, "MP_SIMULATED_BATCH_SECONDS": str(batch_seconds)}
    server = subprocess.Popen([sys.executable, "-m", "mp_pipelines.cli", "serve-model", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(400):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            return server, url
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"the simulated model server on port {port} did not start")


def workflow_yaml(n: int) -> str:
    words = json.dumps([f"ticket {i:05d}" for i in range(n)])
    return (f"name: bench_batch\nbreadth: 64\nmax_items: {max(n, 1)}\ncache: off\n"
            "defaults: {model: gpt-4o-mini, temperature: 0, max_tokens: 60}\n"
            f"inputs:\n  items: {{type: list, default: {words}}}\n"
            "tasks:\n  - name: label\n    for_each: inputs.items\n"
            "    prompt: \"Give a one-line label for support {{ item }} about a billing question.\"\n")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_once(spec_path: Path, base_url: str, mode: str) -> tuple[Any, float, float]:
    """(outcome, wall seconds, CPU seconds) of one run on a fresh local instance."""
    import dagster as dg

    from mp_pipelines.cli.running import run_workflow
    from mp_pipelines.spec.loader import load_workflow_file

    os.environ.update({"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-bench"})
    with tempfile.TemporaryDirectory() as home:
        with dg.DagsterInstance.local_temp(home, overrides={"telemetry": {"enabled": False}}) as instance:
            spec = load_workflow_file(spec_path)
            cpu, wall = cpu_seconds(), time.monotonic()
            outcome = run_workflow(spec, {}, source=str(spec_path), instance=instance, mode=mode)
            wall, cpu = time.monotonic() - wall, cpu_seconds() - cpu
    assert outcome.success, outcome.as_text()
    return outcome, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--wait", type=float, default=60.0, help="seconds the slow server's batch takes")
    parser.add_argument("--poll", type=float, default=5.0, help="MP_BATCH_POLL_SECONDS for the runs")
    parser.add_argument("--wait-items", type=int, default=200, help="items of the runs that measure waiting")
    args = parser.parse_args()
    os.environ["MP_BATCH_POLL_SECONDS"] = str(args.poll)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, small_path = Path(tmp) / "bench_batch.yaml", Path(tmp) / "small" / "bench_batch.yaml"
        spec_path.write_text(workflow_yaml(args.n))
        small_path.parent.mkdir()
        small_path.write_text(workflow_yaml(args.wait_items))
        server, url = start_server(0.0)
        try:
            online, online_wall, online_cpu = run_once(spec_path, url, "online")
            batch, batch_wall, batch_cpu = run_once(spec_path, url, "batch")
            quick, _, quick_cpu = run_once(small_path, url, "batch")
        finally:
            server.kill()
        slow_server, slow_url = start_server(args.wait)
        try:
            waited, waited_wall, waited_cpu = run_once(small_path, slow_url, "batch")
        finally:
            slow_server.kill()
    same = sum(a == b for a, b in zip(online.tasks["label"]["output"], batch.tasks["label"]["output"]))
    assert same == args.n == len(batch.tasks["label"]["output"]), f"{same} of {args.n} answers match"
    assert waited.tasks["label"]["output"] == quick.tasks["label"]["output"]
    share = batch.usage.cost_usd / online.usage.cost_usd
    print(f"items: {args.n}, answers equal online and batch: {same}")
    print(f"online: ${online.usage.cost_usd:.4f}, {online.usage.calls} calls, {online_wall:.1f} s, CPU {online_cpu:.1f} s")
    print(f"batch:  ${batch.usage.cost_usd:.4f}, {batch.usage.batch_requests} batch requests, saving "
          f"${batch.usage.batch_saving_usd:.4f}, {batch_wall:.1f} s, CPU {batch_cpu:.1f} s")
    print(f"{args.wait_items} items in batch mode: CPU {quick_cpu:.2f} s when the batch completes at once, "
          f"{waited_cpu:.2f} s when it takes {args.wait:g} s ({waited_wall:.1f} s wall)")
    print(f"batch_share={share:.4f} cpu_while_waiting_s={waited_cpu - quick_cpu:.2f}")


if __name__ == "__main__":
    main()
