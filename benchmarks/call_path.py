"""CPU per model call spent in the call path itself: rendering, the stages, accounting — no HTTP.

N requests of a fan-out task go through `tasks.runner.arun_task` (every stage of `calls/path.py`, with a
run limit, a breadth and a budget in force) against a model that answers at once, C at a time, on one
event loop. What is left is the project's own CPU per call: the part of "CPU per prompt" a change to the
call path moves. With `--compare PATH`, the same script runs from another checkout of this layout (e.g.
`git worktree add PATH COMMIT`) right after, interleaved for --repeats rounds.

Usage: python benchmarks/call_path.py [--n 20000] [--concurrency 200] [--repeats 3] [--compare PATH]
The last line is `us_per_call=X` (median), and `other_us_per_call=Y` with --compare.

With `MP_BENCH_IN_STEP=1` this checkout's calls run as a step's calls do (inside a step tally, with the
telemetry the environment turns on, e.g. OTEL_EXPORTER_OTLP_ENDPOINT, its export included in the CPU);
a checkout without telemetry ignores it (docs/observability.md: overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


class InstantModel:
    """A ChatModel that answers every request at once, as an endpoint with no latency would."""

    default_model = "gpt-4o-mini"
    timeout = 60.0

    async def acomplete(self, request: Any, on_response: Any = None) -> Any:
        from mp_pipelines.llm.types import LLMResult

        if on_response is not None:
            on_response(200, {})
        return LLMResult(text="ok", parsed=None, model=self.default_model, provider="openai", prompt_tokens=10,
                         completion_tokens=5, latency_s=0.0, finish_reason="stop", attempts=1)

    def endpoint_key(self) -> str:
        return "openai:instant"

    def limit_settings(self) -> Any:
        from mp_pipelines.llm.types import LimitSettings

        return LimitSettings()


def measure(n: int, concurrency: int) -> float:
    """Microseconds of CPU per call for n calls, C in flight."""
    from mp_pipelines.calls.call import CallScope
    from mp_pipelines.calls.run import RunCalls
    from mp_pipelines.llm.types import LimitSettings
    from mp_pipelines.spec.loader import parse_workflow
    from mp_pipelines.spec.models import BudgetSpec
    from mp_pipelines.tasks.runner import arun_task

    spec = parse_workflow({"name": "bench", "inputs": {"items": {"type": "list", "default": []}},
                           "tasks": [{"name": "t", "for_each": "inputs.items", "prompt": "say {{ item }}"}]})
    task = spec.all_tasks()[0]
    scope = CallScope(RunCalls("bench"), LimitSettings(max_in_flight=10 * concurrency), "t", concurrency,
                      budget=BudgetSpec(max_calls=10**9), root_run_id="bench")
    model = InstantModel()

    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with gate:
                await arun_task(model, spec, task, {"item": index, "inputs": {}}, label=f"t[{index}]", scope=scope)

        await asyncio.gather(*(one(i) for i in range(n)))

    before = resource.getrusage(resource.RUSAGE_SELF)
    if os.environ.get("MP_BENCH_IN_STEP") == "1":
        from mp_pipelines.telemetry.setup import active
        from mp_pipelines.telemetry.tally import StepTally, tallying

        telemetry = active()
        with tallying(StepTally("bench", "t", telemetry)):
            asyncio.run(main())
        if telemetry is not None:
            telemetry.flush()
    else:
        asyncio.run(main())
    after = resource.getrusage(resource.RUSAGE_SELF)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / n * 1e6


def child(root: Path, n: int, concurrency: int) -> float:
    """`measure` in a fresh process importing the package from `root`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, str(root / "benchmarks" / "call_path.py"), "--child", "--n", str(n),
                                "--concurrency", str(concurrency)], capture_output=True, text=True, check=True,
                               env=env, cwd=root)
    return float(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another checkout of this layout, measured side by side")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{measure(args.n, args.concurrency):.2f}")
        return
    here = Path(__file__).resolve().parents[1]
    roots = {"this": here, **({"other": args.compare.resolve()} if args.compare else {})}
    runs: dict[str, list[float]] = {name: [] for name in roots}
    for _ in range(args.repeats):
        for name, root in roots.items():
            runs[name].append(child(root, args.n, args.concurrency))
    for name, values in runs.items():
        print(f"{name:<5} {statistics.median(values):7.1f} us CPU per call  runs " + " ".join(f"{v:.1f}" for v in values))
    print(f"us_per_call={statistics.median(runs['this']):.1f}")
    if args.compare:
        print(f"other_us_per_call={statistics.median(runs['other']):.1f}")


if __name__ == "__main__":
    main()
