"""Fan-out benchmark: N prompts at latency L and concurrency C, four ways, side by side in one run.

  (a) floor: asyncio.gather over openai.AsyncOpenAI with a semaphore of C
  (b) the generated Dagster job: its default (concurrent) executor, sharded fan-out, breadth C
  (c) one op per item on Dagster's multiprocess executor (capped at --cap items, extrapolated)
  (d) one op per item on Dagster's in-process executor (capped likewise)

Every variant runs in its own child process against one loopback OpenAI-compatible server (the
simulated model, `mp-pipelines serve-model`) in another process, so peak RSS is per variant.
With `--compare PATH`, variant (b) also runs from another checkout (e.g. `git worktree add PATH COMMIT`),
right after this one's, against the same server: a change to the call path measured side by side.

  (e) `mp-pipelines run` of the same workflow, timed as a whole process (imports and summary included)

Every variant reports its wall time and its CPU (user + system of the process and its children) from the moment
its imports are done and its instance folder exists (created by an instance opened and closed before, as for every
run but a user's first), except (e), which is the whole CLI process (in a folder whose instance exists).
(b) on SQLite uses the storage `mp-pipelines run` uses (the pooled SQLite storage, mp_pipelines/dagster_ext/sqlite.py).
benchmarks/targets.py runs (a), (b) and (e) at the sizes of the performance targets, repeated, with PASS/FAIL.

    python benchmarks/fanout.py --n 1000 --latency 0.5 --concurrency 100 --storage sqlite [--compare PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the project and its test helpers (a throw-away PostgreSQL database)

VARIANTS = ("a", "b", "c", "d", "e")
NAMES = {"a": "floor: asyncio.gather + AsyncOpenAI", "b": "dagster job: concurrent executor, shards",
         "c": "one op per item, multiprocess", "d": "one op per item, in-process",
         "e": "mp-pipelines run (whole CLI process)"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    """The simulated model over HTTP in its own process; returns it and its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mp_pipelines.cli", "serve-model", "--port", str(port),
                               "--latency", str(latency)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            return server, url
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"the simulated model server on port {port} did not start")


# ---- variants (each runs in a child process: `fanout.py --variant X ...`) ----

async def _floor(n: int, concurrency: int, base_url: str) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=2)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with semaphore:
            answer = await client.chat.completions.create(model="gpt-4o-mini",
                                                          messages=[{"role": "user", "content": f"Echo item {i}"}])
            return answer.choices[0].message.content or ""

    results = await asyncio.gather(*(one(i) for i in range(n)))
    assert len(results) == n
    await client.close()


def workflow_yaml(n: int, concurrency: int, per_item: bool) -> str:
    shard = "\n    shard_size: 1" if per_item else ""
    return (f"name: bench_fanout\nbreadth: {concurrency}\nmax_items: {max(n, 1)}\n"
            f"inputs:\n  items: {{type: list}}\n"
            f"tasks:\n  - name: echo\n    for_each: inputs.items\n    prompt: \"Echo {{{{ item }}}}\"{shard}\n")


def instance_for(storage: str, home: Path, dbname: str | None):
    import dagster as dg

    from mp_pipelines.dagster_ext.compute_logs import compute_logs_config

    # the compute logs `mp-pipelines run` uses for its local instance (cli/running.py)
    overrides: dict = {"telemetry": {"enabled": False}, "compute_logs": compute_logs_config(str(home / "storage"))}
    if storage == "sqlite":  # the storage `mp-pipelines run` uses for its local instance (cli/running.py)
        from mp_pipelines.dagster_ext.sqlite import pooled_storage_config

        overrides["storage"] = pooled_storage_config(str(home))
    if storage == "postgres":
        from mp_pipelines_tests.postgres import postgres_storage_config

        # the pooled storage deploy/dagster.yaml uses (docs/performance.md: PostgreSQL per-step cost)
        overrides["storage"] = {"custom": {"module": "mp_pipelines.storage", "class": "PooledPostgresStorage",
                                           "config": {**postgres_storage_config(dbname)["postgres"], "pool_size": 8}}}
    return dg.DagsterInstance.local_temp(str(home), overrides=overrides)


def _dagster(variant: str, n: int, concurrency: int, storage: str, dbname: str | None, tmp: Path) -> int:
    """Run the generated job as `mp-pipelines run` does (cli/running.py: the result is not entered as a context,
    which would set up the run's resources again); returns the number of Dagster steps it ran."""
    import dagster as dg

    from mp_pipelines.cli.config import run_config

    spec_path = tmp / "bench_fanout.yaml"
    spec_path.write_text(workflow_yaml(n, concurrency, per_item=variant != "b"))
    executor = {"b": None, "c": "multiprocess", "d": "in_process"}[variant]
    config = run_config({"items": [f"item {i}" for i in range(n)]}, executor)
    if variant == "c":
        config["execution"] = {"config": {"multiprocess": {"max_concurrent": concurrency}}}
    from mp_pipelines.definitions import jobs_built_once

    with jobs_built_once():  # as `mp-pipelines run` does (cli/running.py): one build of the job per run
        job = dg.build_reconstructable_job("mp_pipelines.definitions", "get_job",
                                           reconstructable_args=("bench_fanout", str(spec_path)))
        with instance_for(storage, tmp / "home", dbname) as instance:
            result = dg.execute_job(job, instance=instance, run_config=config)
            if not result.success:
                raise SystemExit(f"variant {variant}: the run failed")
            return len({e.step_key for e in result.all_events if e.event_type_value == "STEP_START"})


def child(args: argparse.Namespace) -> None:
    """Run one variant and print its measurements as JSON."""
    os.environ["OPENAI_BASE_URL"] = args.base_url
    os.environ["OPENAI_API_KEY"] = "bench"
    # Imports are a constant cost, not a cost of N or C: pay them before the clock starts (a CLI run
    # pays about 3 s of `import dagster` on top; docs/performance.md says so).
    import openai  # noqa: F401

    if args.variant != "a":
        import dagster  # noqa: F401

        import mp_pipelines.cli.running  # noqa: F401 - what `mp-pipelines run` imports (its storage, Dagster's)
        import mp_pipelines.definitions  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        if args.variant != "a":  # an instance folder that exists, as for every run of a user's but the first
            (Path(tmp) / "home").mkdir()
            instance_for(args.storage, Path(tmp) / "home", args.dbname).dispose()
        cpu_before = _cpu()
        started = time.perf_counter()
        steps = 0
        if args.variant == "a":
            asyncio.run(_floor(args.n, args.concurrency, args.base_url))
        else:
            steps = _dagster(args.variant, args.n, args.concurrency, args.storage, args.dbname, Path(tmp))
        wall = time.perf_counter() - started
        cpu = _cpu() - cpu_before
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_kib": max(own, children), "steps": steps}))


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_cli(n: int, args: argparse.Namespace, base_url: str, root: Path = REPO) -> dict:
    """Variant (e): `mp-pipelines run` of the fan-out workflow as a user runs it, timed as a whole process (imports,
    instance, run, summary), in a working folder whose instance exists; CPU is the process's user + system time."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, inputs = Path(tmp) / "bench_fanout.yaml", Path(tmp) / "inputs.json"
        spec_path.write_text(workflow_yaml(n, args.concurrency, per_item=False))
        inputs.write_text(json.dumps({"items": [f"item {i}" for i in range(n)]}))
        env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "bench",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        env.pop("DAGSTER_HOME", None)
        # The instance folder exists, as for every run of a user's but the first (variant b's folder is made alike).
        subprocess.run([sys.executable, "-c", "from mp_pipelines.cli.running import local_instance as i; "
                        "i().dispose()"], cwd=tmp, env=env, check=True)
        wall, cpu, out, err, code = process_wall_and_cpu(
            [sys.executable, "-m", "mp_pipelines.cli", "run", str(spec_path), "--input-file", str(inputs), "--json"],
            env, Path(tmp))
        if code != 0:
            raise SystemExit(f"variant e failed:\n{err[-3000:]}")
        if json.loads(out)["status"] != "success":
            raise SystemExit(f"variant e: the run did not succeed:\n{out[-3000:]}")
        return {"wall": wall, "cpu": cpu, "process_wall": wall, "process_cpu": cpu, "rss_kib": 0, "steps": 0}


def process_wall_and_cpu(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str, str, int]:
    """Run `command`; its wall seconds, user + system CPU seconds (it and its children), stdout, stderr, exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=cwd, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, completed.stdout, completed.stderr, completed.returncode


def run_variant(variant: str, n: int, args: argparse.Namespace, base_url: str, dbname: str | None,
                root: Path = REPO) -> dict:
    """One variant in a child process, from the checkout at `root` (its own benchmark script and package)."""
    command = [sys.executable, str(root / "benchmarks" / "fanout.py"), "--variant", variant, "--n", str(n),
               "--concurrency", str(args.concurrency), "--latency", str(args.latency), "--storage", args.storage,
               "--base-url", base_url]
    if dbname:
        command += ["--dbname", dbname]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    if variant == "e":
        return run_cli(n, args, base_url, root)
    process_wall, process_cpu, out, err, code = process_wall_and_cpu(command, env, root)
    if code != 0:
        raise SystemExit(f"variant {variant} failed:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "process_wall": process_wall, "process_cpu": process_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="prompts")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per answer")
    parser.add_argument("--concurrency", type=int, default=100, help="calls in flight (C)")
    parser.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--cap", type=int, default=60, help="items for variants c and d (extrapolated to N)")
    parser.add_argument("--variants", default="abcd", help="which variants to run, e.g. ab")
    parser.add_argument("--compare", type=Path, help="another checkout whose variant (b) runs side by side")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--dbname", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return

    server, base_url = start_server(args.latency)
    ideal = math.ceil(args.n / args.concurrency) * args.latency
    rows = []
    try:
        for variant in args.variants:
            n = args.n if variant in "abe" else min(args.n, args.cap)
            dbname_cm = _database(args.storage)
            with dbname_cm as dbname:
                measured = run_variant(variant, n, args, base_url, dbname)
            wall = measured["wall"]
            if n < args.n:  # extrapolate linearly in the number of items (say so in the table)
                wall = wall * args.n / n
            rows.append((variant, n, wall, measured))
        if args.compare and "b" in args.variants:
            with _database(args.storage) as dbname:
                other = run_variant("b", args.n, args, base_url, dbname, root=args.compare.resolve())
    finally:
        server.terminate()
        server.wait(timeout=10)

    floor = next((wall for v, _, wall, _ in rows if v == "a"), None)
    print(f"N={args.n} latency={args.latency}s concurrency={args.concurrency} storage={args.storage} "
          f"ideal=ceil(N/C)*L={ideal:.2f}s cores={os.cpu_count()}")
    print(f"{'variant':<44} {'items run':>9} {'wall s':>8} {'/floor':>7} {'/ideal':>7} {'peak RSS MiB':>12} {'steps':>6}"
          f" {'CPU ms/item':>11}")
    for variant, n, wall, measured in rows:
        note = " (extrapolated)" if n < args.n else ""
        ratio = f"{wall / floor:7.2f}" if floor else "      -"
        print(f"{variant}) {NAMES[variant] + note:<41} {n:>9} {wall:8.2f} {ratio} {wall / ideal:7.2f} "
              f"{measured['rss_kib'] / 1024:12.0f} {measured['steps']:>6} {measured['cpu'] * 1000 / n:11.2f}")
    job = next((wall for v, _, wall, _ in rows if v == "b"), None)
    if floor and job:
        for variant, _, wall, _ in rows:
            if variant in "cd":
                print(f"b_faster_than_{variant}={wall / job:.1f}x")
        print(f"ratio_to_floor={job / floor:.2f}")
    if args.compare and "b" in args.variants:
        print(f"b) {'same, from ' + str(args.compare):<41} {args.n:>9} {other['wall']:8.2f} "
              f"{(other['wall'] / floor if floor else 0):7.2f} {other['wall'] / ideal:7.2f} "
              f"{other['rss_kib'] / 1024:12.0f} {other['steps']:>6}")
        if floor:
            print(f"compare_ratio_to_floor={other['wall'] / floor:.2f}")


class _database:
    """A throw-away PostgreSQL database for one variant (nothing for SQLite)."""

    def __init__(self, storage: str) -> None:
        self._storage, self._cm = storage, None

    def __enter__(self) -> str | None:
        if self._storage != "postgres":
            return None
        from mp_pipelines_tests.postgres import temporary_database

        self._cm = temporary_database()
        return self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


if __name__ == "__main__":
    main()
