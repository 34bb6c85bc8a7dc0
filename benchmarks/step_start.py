"""What a step process pays before its step runs: import the code location and rebuild the job it runs.

Dagster's multiprocess executor (and every run worker) starts a fresh Python process that imports
`mp_pipelines.definitions` and calls `get_job(...)` to rebuild the one job of the run. Side by side in
one invocation, interleaved round by round, this times fresh processes doing:

  floor     `import dagster, openai, pandas`: the libraries alone
  step      import mp_pipelines.definitions, then get_job(WORKFLOW): what a step process does
  other     (with --compare PATH) the same "step" for the checkout at PATH (e.g. another commit, made
            with `git worktree add PATH COMMIT`), imported from there through PYTHONPATH

Each figure is the wall time of the whole process (interpreter start included), median of --repeats.
The last line is `step_minus_floor=X.XXs` (and `other_minus_floor=…` with --compare).

Usage: python benchmarks/step_start.py [--repeats 5] [--workflow research_report] [--compare PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLOOR = "import dagster, openai, pandas"
STEP = "import mp_pipelines.definitions as d; d.get_job({workflow!r})"


def timed(code: str, root: Path | None) -> float:
    """Wall seconds of a fresh `python -c code` (from `root`'s checkout when given)."""
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root or Path.cwd(),
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workflow", default="research_report")
    parser.add_argument("--compare", type=Path, help="another checkout to time side by side")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    variants = {"floor": (FLOOR, None), "step": (STEP.format(workflow=args.workflow), here)}
    if args.compare:
        variants["other"] = (STEP.format(workflow=args.workflow), args.compare.resolve())
    times: dict[str, list[float]] = {name: [] for name in variants}
    timed(FLOOR, None)  # warm the file cache
    for _ in range(args.repeats):
        for name, (code, root) in variants.items():
            times[name].append(timed(code, root))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:<6} median {medians[name]:.2f}s  runs " + " ".join(f"{v:.2f}" for v in values))
    print(f"step_minus_floor={medians['step'] - medians['floor']:.2f}s")
    if "other" in medians:
        print(f"other_minus_floor={medians['other'] - medians['floor']:.2f}s")


if __name__ == "__main__":
    main()
