"""The orchestration-overhead targets, measured side by side in one invocation, each with its target and PASS/FAIL.

Against one loopback OpenAI-compatible server (the simulated model, latency L = 0.5 s) this runs, --repeats times
and interleaved, the variants of benchmarks/fanout.py: (a) the floor, a plain asyncio.gather over AsyncOpenAI with
a semaphore of C; (b) the generated Dagster job; (e) `mp-pipelines run` of the same workflow as a whole process.
Figures are medians over the repeats; "in-run" is wall time from the end of imports (fanout.py says how), CPU is
user + system seconds of the variant's processes over the same span, per prompt.

  N=10,    C=100   (b) in-run <= (a) + 0.5 s
  N=100,   C=100   (b) / (a) in-run <= 1.3
  N=1000,  C=100   (b) / (a) in-run <= 1.08; (e) process wall <= (a) process wall + 2 s; CPU per prompt (b) / (a) <= 1.3
  N=10000, C=200   (b) / (a) in-run <= 1.05; CPU per prompt (b) / (a) <= 1.3

Then benchmarks/cli_overhead.py: `mp-pipelines run research_report` against a bare `import dagster, openai, pandas`
(+ 1.0 s, with a breakdown) and `list` / `validate` / `show` against a bare `import yaml, jinja2, pydantic` (+ 0.3 s).

    python benchmarks/targets.py [--repeats 3] [--skip 10000] [--no-cli]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fanout  # noqa: E402 - the benchmark next to this file

LATENCY = 0.5
CASES = ((10, 100, "ab"), (100, 100, "ab"), (1000, 100, "abe"), (10000, 200, "ab"))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", type=int, action="append", default=[], help="leave out the case with this N")
    parser.add_argument("--no-cli", action="store_true", help="leave out benchmarks/cli_overhead.py")
    args = parser.parse_args()
    cases = [case for case in CASES if case[0] not in args.skip]
    server, base_url = fanout.start_server(LATENCY)
    results: dict[tuple[int, str], list[dict]] = {}
    try:
        for _ in range(args.repeats):
            for n, concurrency, variants in cases:
                options = argparse.Namespace(concurrency=concurrency, latency=LATENCY, storage="sqlite")
                for variant in variants:
                    results.setdefault((n, variant), []).append(
                        fanout.run_variant(variant, n, options, base_url, None))
    finally:
        server.terminate()
        server.wait(timeout=10)

    def median(n: int, variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(n, variant)])

    print(f"latency {LATENCY} s, {args.repeats} repeat(s), medians; loopback server in its own process")
    print(f"{'N':>6} {'C':>4} {'variant':<46} {'in-run s':>9} {'runs':<22} {'CPU ms/prompt':>13} {'process s':>9}")
    for n, concurrency, variants in cases:
        for variant in variants:
            runs = " ".join(f"{r['wall']:.2f}" for r in results[(n, variant)])
            print(f"{n:>6} {concurrency:>4} {variant}) {fanout.NAMES[variant]:<43} {median(n, variant, 'wall'):9.2f} "
                  f"{runs:<22} {median(n, variant, 'cpu') * 1000 / n:13.2f} {median(n, variant, 'process_wall'):9.2f}")
    print()
    for n, concurrency, _ in cases:
        floor, job = median(n, "a", "wall"), median(n, "b", "wall")
        cpu_ratio = median(n, "b", "cpu") / median(n, "a", "cpu")
        head = f"N={n} C={concurrency}:"
        if n == 10:
            print(f"{head} job in-run {job:.2f} s = floor {floor:.2f} s + {job - floor:.2f} s; target + 0.5 s: "
                  f"{verdict(job - floor <= 0.5)}")
        elif n == 100:
            print(f"{head} job / floor in-run {job / floor:.2f}; target <= 1.3: {verdict(job / floor <= 1.3)}")
        elif n == 1000:
            print(f"{head} job / floor in-run {job / floor:.2f}; target <= 1.08: {verdict(job / floor <= 1.08)}")
            cli, floor_process = median(n, "e", "process_wall"), median(n, "a", "process_wall")
            print(f"{head} CLI process {cli:.2f} s = floor process {floor_process:.2f} s + {cli - floor_process:.2f} s; "
                  f"target + 2 s: {verdict(cli - floor_process <= 2.0)}")
            print(f"{head} CPU per prompt {median(n, 'b', 'cpu') * 1000 / n:.2f} ms vs floor "
                  f"{median(n, 'a', 'cpu') * 1000 / n:.2f} ms = {cpu_ratio:.2f}x; target <= 1.3x: "
                  f"{verdict(cpu_ratio <= 1.3)}")
        else:
            print(f"{head} job / floor in-run {job / floor:.2f}; target <= 1.05: {verdict(job / floor <= 1.05)}")
            print(f"{head} CPU per prompt {median(n, 'b', 'cpu') * 1000 / n:.2f} ms vs floor "
                  f"{median(n, 'a', 'cpu') * 1000 / n:.2f} ms = {cpu_ratio:.2f}x; target <= 1.3x: "
                  f"{verdict(cpu_ratio <= 1.3)}")
    sys.stdout.flush()
    if not args.no_cli:
        print()
        subprocess.run([sys.executable, str(HERE / "cli_overhead.py"), "--repeats", str(args.repeats)], check=True)


if __name__ == "__main__":
    main()
