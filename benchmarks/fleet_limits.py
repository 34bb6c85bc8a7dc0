"""Three `mp-pipelines run` processes share one model's `requests_per_minute: 600` for about two minutes.

Each process runs its own fan-out (`--items` prompts) with `MP_REQUESTS_PER_MINUTE=600` and `MP_FLEET_LIMITS=on`
against one loopback server that records every request; one 429 with `Retry-After: 2` is injected once all
three are sending. Prints, per backend (the instance's PostgreSQL, Redis): the requests, the overall rate, the
busiest 60-second window, the busiest second, and the requests any process sent in the 2 s after the 429.

    python benchmarks/fleet_limits.py --items 400 [--backends postgres,redis]

Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379), as `.ci/run` starts them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(backend: str, items: int) -> dict[str, object]:
    import dagster as dg
    import redis
    import yaml

    from mp_pipelines_tests.celery_fleet import redis_url_or_skip
    from mp_pipelines_tests.fault_server import run_server
    from mp_pipelines_tests.postgres import postgres_storage_config, temporary_database
    from mp_pipelines_tests.test_fleet_limits import check_fleet_rate_and_pause, run_three

    with tempfile.TemporaryDirectory() as folder, run_server() as server:
        tmp = Path(folder)
        home = tmp / "home"
        home.mkdir()
        env = {"DAGSTER_HOME": str(home),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        if backend == "redis":
            env["MP_LIMITS_REDIS_URL"] = url = redis_url_or_skip()
            (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
            with dg.DagsterInstance.from_config(str(home)) as instance:
                instance.get_runs()
            try:
                results = run_three(tmp, server, env, items)
            finally:
                redis.Redis.from_url(url).flushdb()
        else:
            with temporary_database() as dbname:
                (home / "dagster.yaml").write_text(yaml.safe_dump(
                    {"storage": postgres_storage_config(dbname), "telemetry": {"enabled": False}}))
                results = run_three(tmp, server, env, items)
        times = sorted(r.time for r in server.requests)
        t429 = next(r.time for r in server.requests if r.fault is not None)
        seconds = collections.Counter(int(t - times[0]) for t in times)
        busiest_minute = max(sum(start <= t < start + 60 for t in times) for start in times)
        figures = {"backend": backend, "requests": len(times), "span_s": round(times[-1] - times[0], 1),
                   "rate_per_min": round(60 * len(times) / (times[-1] - times[0]), 1),
                   "busiest_60s_window": busiest_minute, "busiest_second": max(seconds.values()),
                   "requests_within_2s_after_429": sum(t429 < t < t429 + 2.0 for t in times)}
        check_fleet_rate_and_pause(server, results, items)  # the same checks as the CI test
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=400, help="prompts per process (3 × 400 at 600/min ≈ 2 min)")
    parser.add_argument("--backends", default="postgres,redis")
    args = parser.parse_args()
    os.environ.setdefault("CI", "true")  # a missing service fails instead of skipping
    for backend in args.backends.split(","):
        print(json.dumps(measure(backend.strip(), args.items)), flush=True)


if __name__ == "__main__":
    main()
