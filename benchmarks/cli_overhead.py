"""What the edit-run loop costs: `mp-pipelines run research_report` and `list` / `validate` / `show`, each side by
side with a bare import of the libraries it needs, in one invocation, interleaved round by round.

  floor-run   `python -c "import dagster, openai, pandas"`
  run         `python -m mp_pipelines.cli run research_report --input topic=<new topic>` (offline, the simulated
              model; a new topic each round so no answer comes from the response cache), target floor-run + 1.0 s
  breakdown   the same run in a process that stamps its phases: imports (interpreter start to the libraries and
              the package imported), instance (the local instance opened), run start (to the first step start),
              steps (first step start to the last step end, from the run's event log), teardown (to process exit)
  floor-cli   `python -c "import yaml, jinja2, pydantic"`
  list, validate, show research_report: target floor-cli + 0.3 s; each must not import dagster, openai or pandas

All runs share one instance folder in a temporary working directory, created (and warmed) by a first run that
is not counted: what a user who runs again sees. Figures are medians of --repeats wall times of whole processes;
the run and its floor also print their CPU time (user + system), which a busy machine disturbs less than wall time.

    python benchmarks/cli_overhead.py [--repeats 3] [--compare PATH]

With --compare PATH, the run and the lighter commands also run from another checkout (e.g. `git worktree add
PATH COMMIT`), side by side, without targets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR_RUN = "import dagster, openai, pandas"
FLOOR_CLI = "import yaml, jinja2, pydantic"
RUN_TARGET_S = 1.0
CLI_TARGET_S = 0.3
HEAVY = ("dagster", "openai", "pandas")

# The run command in a process that stamps its phases; argv: start time, stamp file, CLI arguments...
STAMPED_RUN = r"""
import atexit, json, sys, time
stamps = {"start": float(sys.argv[1])}
out = sys.argv[2]
import dagster, openai, pandas
from mp_pipelines.cli import running
import mp_pipelines.definitions
stamps["imports"] = time.time()
_local_instance, _summarize = running.local_instance, running.summarize
def local_instance():
    instance = _local_instance()
    stamps["instance"] = time.time()
    return instance
def summarize(result, *args, **kwargs):
    stamps["run_id"] = result.run_id
    return _summarize(result, *args, **kwargs)
running.local_instance, running.summarize = local_instance, summarize
atexit.register(lambda: open(out, "w").write(json.dumps(stamps)))
from mp_pipelines.cli.main import main
main(sys.argv[3:])
"""

# argv: run ids...; prints {run_id: [first STEP_START, last step end]} from the local instance.
STEP_SPANS = r"""
import json, sys
import dagster as dg
from mp_pipelines.cli.running import local_instance
instance = local_instance()
spans = {}
for run_id in sys.argv[1:]:
    records = instance.get_records_for_run(run_id, limit=100000).records
    starts = [r.event_log_entry.timestamp for r in records
              if r.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_START]
    ends = [r.event_log_entry.timestamp for r in records if r.event_log_entry.dagster_event_type in
            (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.STEP_SKIPPED)]
    spans[run_id] = [min(starts), max(ends)]
print(json.dumps(spans))
"""


def _env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("OPENAI_API_KEY", "OPENAI_BASE_URL",
                                                                          "DAGSTER_HOME")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))
    return env


def timed(argv: list[str], cwd: Path, env: dict[str, str], cpu: list[float] | None = None) -> float:
    """Wall seconds of one process (its CPU seconds, user + system, appended to `cpu`); raises when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return elapsed


def run_argv(topic: str) -> list[str]:
    return [sys.executable, "-m", "mp_pipelines.cli", "run", "research_report", "--input", f"topic={topic}"]


def stamped_run(cwd: Path, env: dict[str, str], stamp_file: Path) -> tuple[float, dict[str, float]]:
    topic = f"benchmark {uuid.uuid4().hex[:8]}"
    started_wall = time.time()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", STAMPED_RUN, str(started_wall), str(stamp_file), "run", "research_report",
                    "--input", f"topic={topic}"], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    elapsed = time.perf_counter() - started
    stamps = json.loads(stamp_file.read_text())
    stamps["end"] = started_wall + elapsed
    return elapsed, stamps


def heavy_imports(command: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    """Which of dagster/openai/pandas the CLI command imports."""
    code = ("import sys, runpy; sys.argv = ['mp-pipelines', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mp_pipelines.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *command], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    line = [x for x in done.stderr.splitlines() if x.startswith("HEAVY=")]
    return [m for m in line[-1][len("HEAVY="):].split(",") if m] if line else ["(no answer)"]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another checkout to time side by side (no targets)")
    args = parser.parse_args()
    roots = {"": REPO}
    if args.compare:
        roots["other "] = args.compare.resolve()
    cli_commands = {"list": ["list"], "validate": ["validate"], "show": ["show", "research_report"]}
    with tempfile.TemporaryDirectory(prefix="mp-cli-overhead-") as tmp:
        work = Path(tmp)
        env = {label: _env(root) for label, root in roots.items()}
        for label in roots:  # warm: the instance folder exists, the file cache holds the libraries
            timed(run_argv("warm-up"), work, env[label])
        times: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}  # CPU seconds of the same processes: steadier than wall on a busy machine
        phases: list[dict[str, float]] = []
        for _ in range(args.repeats):
            times.setdefault("floor-run", []).append(
                timed([sys.executable, "-c", FLOOR_RUN], work, env[""], cpus.setdefault("floor-run", [])))
            for label in roots:
                times.setdefault(f"{label}run", []).append(
                    timed(run_argv(f"benchmark {uuid.uuid4().hex[:8]}"), work, env[label],
                          cpus.setdefault(f"{label}run", [])))
            elapsed, stamps = stamped_run(work, env[""], work / "stamps.json")
            times.setdefault("stamped run", []).append(elapsed)
            phases.append(stamps)
            times.setdefault("floor-cli", []).append(timed([sys.executable, "-c", FLOOR_CLI], work, env[""]))
            for label in roots:
                for name, command in cli_commands.items():
                    times.setdefault(f"{label}{name}", []).append(
                        timed([sys.executable, "-m", "mp_pipelines.cli", *command], work, env[label]))
        spans = json.loads(subprocess.run([sys.executable, "-c", STEP_SPANS, *(p["run_id"] for p in phases)],
                                          cwd=work, env=env[""], capture_output=True, text=True, check=True).stdout)
        heavy = {name: heavy_imports(command, work, env[""]) for name, command in cli_commands.items()}

    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:<14} median {median[name]:5.2f} s   runs " + " ".join(f"{v:.2f}" for v in values))

    for name, values in cpus.items():
        print(f"{name:<14} CPU (user+sys) median {statistics.median(values):5.2f} s   runs "
              + " ".join(f"{v:.2f}" for v in values))

    rows = []
    for stamps in phases:
        first_step, last_step = spans[stamps["run_id"]]
        rows.append({"imports": stamps["imports"] - stamps["start"], "instance": stamps["instance"] - stamps["imports"],
                     "run start": first_step - stamps["instance"], "steps": last_step - first_step,
                     "teardown": stamps["end"] - last_step})
    print("breakdown of the stamped run (median of each phase, s): " + ", ".join(
        f"{phase} {statistics.median(row[phase] for row in rows):.2f}" for phase in rows[0]))
    print()
    run_extra = median["run"] - median["floor-run"]
    print(f"run research_report: {median['run']:.2f} s = bare import {median['floor-run']:.2f} s + {run_extra:.2f} s; "
          f"target + {RUN_TARGET_S:.1f} s: {verdict(run_extra <= RUN_TARGET_S)}")
    if "other run" in median:
        print(f"  other checkout: + {median['other run'] - median['floor-run']:.2f} s")
    cpu_median = {name: statistics.median(values) for name, values in cpus.items()}
    print(f"run research_report CPU: {cpu_median['run']:.2f} s = bare import {cpu_median['floor-run']:.2f} s + "
          f"{cpu_median['run'] - cpu_median['floor-run']:.2f} s"
          + (f" (other checkout: + {cpu_median['other run'] - cpu_median['floor-run']:.2f} s)"
             if "other run" in cpu_median else ""))
    for name in cli_commands:
        extra = median[name] - median["floor-cli"]
        clean = not heavy[name]
        print(f"{name}: {median[name]:.2f} s = bare import {median['floor-cli']:.2f} s + {extra:.2f} s; target + "
              f"{CLI_TARGET_S:.1f} s: {verdict(extra <= CLI_TARGET_S)}; imports dagster/openai/pandas: "
              f"{', '.join(heavy[name]) or 'none'} ({verdict(clean)})")
        if f"other {name}" in median:
            print(f"  other checkout: + {median[f'other {name}'] - median['floor-cli']:.2f} s")


if __name__ == "__main__":
    main()
