"""Bad-weather benchmark: a fan-out with the default settings (no `retries:`) against a loopback endpoint that
fails a seeded random share of requests; prints the run's time, its requests and the extra requests retries
cost, and whether every item was answered once.

    python benchmarks/bad_weather.py --items 2000 --weather 5xx    # 20 % random HTTP 500/503
    python benchmarks/bad_weather.py --items 2000 --weather 429    # 30 % HTTP 429 with Retry-After: 1

The run is the generated Dagster job on its default executor and a temporary local instance, through the
real openai client; the server is `mp_pipelines_tests/fault_server.py` in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--weather", choices=("5xx", "429"), default="5xx")
    parser.add_argument("--rate", type=float, default=None, help="share of failed requests (5xx: 0.2, 429: 0.3)")
    parser.add_argument("--retry-after", default="1", help="Retry-After of the 429s, seconds")
    parser.add_argument("--breadth", type=int, default=8, help="the workflow's breadth (8 is the default)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    import dagster as dg

    from mp_pipelines.cli.running import run_workflow
    from mp_pipelines.spec.loader import parse_workflow
    from mp_pipelines_tests.fault_server import FaultScript, make_fault, run_server

    if args.weather == "5xx":
        rate, kinds = 0.2 if args.rate is None else args.rate, ["server_error", "unavailable"]
    else:
        throttled = make_fault("rate_limit", headers={"retry-after": args.retry_after})
        rate, kinds = 0.3 if args.rate is None else args.rate, [throttled]
    words = [f"w{i:05d}" for i in range(args.items)]
    data = {"name": "bad_weather", "breadth": args.breadth, "max_items": max(args.items, 1000), "cache": "off",
            "inputs": {"words": {"type": "list", "default": words}},
            "tasks": [{"name": "echo", "for_each": "inputs.words", "prompt": "Echo {{ item }}"}]}
    spec = parse_workflow(data)
    with run_server(faults=FaultScript(rate, seed=args.seed, kinds=kinds)) as server, \
            tempfile.TemporaryDirectory() as home:
        source = Path(home) / "bad_weather.yaml"
        source.write_text(json.dumps(data))  # JSON is YAML
        os.environ.update(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-benchmark")
        with dg.DagsterInstance.local_temp(home, overrides={"telemetry": {"enabled": False}}) as instance:
            started = time.perf_counter()
            outcome = run_workflow(spec, {}, source=str(source), instance=instance)
            seconds = time.perf_counter() - started
        prompts = Counter(r.body["messages"][-1]["content"] for r in server.requests if isinstance(r.body, dict))
        faults = Counter(r.fault for r in server.requests if r.fault)
        answered = [o for o in (outcome.tasks["echo"].get("output") or [])]
        in_order = [o.split("Echo ")[-1][:6] for o in answered] == words
        usage = outcome.usage
        print(json.dumps({
            "weather": args.weather, "failure_rate": rate, "items": args.items, "breadth": args.breadth,
            "success": outcome.success, "answers_in_order": in_order, "seconds": round(seconds, 1),
            "requests": len(server.requests), "extra_requests": len(server.requests) - args.items,
            "extra_per_item": round((len(server.requests) - args.items) / args.items, 3),
            "faults": dict(faults), "most_requests_for_one_item": max(prompts.values()) if prompts else 0,
            "usage_retries": usage.retries, "usage_rate_limited": usage.rate_limited, "calls": usage.calls,
        }, indent=1))


if __name__ == "__main__":
    main()
