"""Per-step storage cost of a Dagster run: SQLite vs stock dagster-postgres vs pooled PostgreSQL.

A job fans out to N trivial mapped steps (`fan_out` -> N x `noop` -> `total`), in-memory IO manager,
Dagster's in-process executor, console logging off: what is left per step is event handling, and
mostly the instance storage writing about a dozen events per step. Each variant runs, in one
invocation and interleaved round by round, on a fresh instance (a fresh temporary folder and, for
PostgreSQL, a freshly created database):

  sqlite   Dagster's default local storage (SQLite files)
  stock    `storage: postgres:` — dagster-postgres, NullPool: a new connection for every read/write
  pooled   `storage: custom: mp_pipelines.storage.PooledPostgresStorage` — same SQL, QueuePool
  bouncer  (only with --pgbouncer PORT) stock dagster-postgres connecting through a PgBouncer
           (transaction pooling) listening on PORT of the same host, forwarding to the server above

Per variant it prints wall seconds of `execute_job`, ms per step (wall / steps, steps = N + 2),
events per step (event-log rows of the run / steps), and two connection counts:

  conns     DBAPI connections opened *during the run*, counted by a SQLAlchemy `connect` listener on
            every pool class in this process (with the in-process executor the whole run happens here)
  sessions  `pg_stat_database.sessions` of the variant's database over its whole life (instance
            set-up, run, dispose), read from the server after every backend has exited (for `bouncer`:
            PgBouncer's server connections, closed with its admin `KILL` before reading)

Usage: python benchmarks/step_overhead.py [--steps 200] [--repeat 1] [--variants sqlite,stock,pooled]
                                         [--pgbouncer 6432]
PostgreSQL comes from DAGSTER_PG_HOST/PORT/USER/PASSWORD (defaults 127.0.0.1:5432, postgres, no password).
The last line is `pooled_vs_stock=X.XX`: pooled ms/step divided by stock ms/step (medians).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Run from a checkout: the pooled storage is loaded by module name from this repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg
import sqlalchemy
from sqlalchemy import event

from mp_pipelines_tests.postgres import PG, settled_sessions  # noqa: E402
from mp_pipelines_tests.postgres import temporary_database as fresh_database  # noqa: E402

VARIANTS = ("sqlite", "stock", "pooled", "bouncer")
PGBOUNCER_PORT: int | None = None


# ----------------------------------------------------------------------------------------- the job


@dg.op(config_schema={"n": int}, out=dg.DynamicOut(int))
def fan_out(context) -> Iterator[dg.DynamicOutput[int]]:
    for i in range(context.op_config["n"]):
        yield dg.DynamicOutput(i, mapping_key=str(i))


@dg.op
def noop(x: int) -> int:
    return x


@dg.op
def total(xs: list[int]) -> int:
    return sum(xs)


@dg.job(resource_defs={"io_manager": dg.mem_io_manager})
def step_overhead_job() -> None:
    total(fan_out().map(noop).collect())


def run_config(n: int) -> dict:
    return {
        "ops": {"fan_out": {"config": {"n": n}}},
        "execution": {"config": {"in_process": {}}},
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }


# ----------------------------------------------------------------------------------- measurement

_connects = 0


@event.listens_for(sqlalchemy.pool.Pool, "connect")
def _count_connect(dbapi_connection: object, connection_record: object) -> None:
    global _connects
    _connects += 1


def close_bouncer_connections(dbname: str) -> None:
    """PgBouncer keeps server connections open; its admin `KILL db` closes them so their sessions are counted."""
    import psycopg2

    admin = psycopg2.connect(dbname="pgbouncer", connect_timeout=5, **{**PG, "port": PGBOUNCER_PORT})
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'KILL "{dbname}"')
    finally:
        admin.close()


def storage_overrides(variant: str, dbname: str | None) -> dict:
    if variant == "sqlite":
        return {}
    pg_db = {"hostname": PG["host"], "port": PG["port"], "username": PG["user"], "password": PG["password"],
             "db_name": dbname}
    if variant == "bouncer":
        return {"storage": {"postgres": {"postgres_db": {**pg_db, "port": PGBOUNCER_PORT}}}}
    if variant == "stock":
        return {"storage": {"postgres": {"postgres_db": pg_db}}}
    if variant == "pooled":
        return {"storage": {"custom": {"module": "mp_pipelines.storage", "class": "PooledPostgresStorage",
                                       "config": {"postgres_db": pg_db}}}}
    raise ValueError(variant)


@dataclass
class Result:
    variant: str
    steps: int
    wall_s: float
    events: int
    conns: int | None
    sessions: int | None

    @property
    def ms_per_step(self) -> float:
        return self.wall_s * 1000 / self.steps


def run_variant(variant: str, n: int) -> Result:
    with tempfile.TemporaryDirectory() as home, \
            (fresh_database() if variant != "sqlite" else _nothing()) as dbname:
        overrides = {"telemetry": {"enabled": False}, **storage_overrides(variant, dbname)}
        with dg.DagsterInstance.local_temp(home, overrides=overrides) as instance:
            recon = dg.reconstructable(step_overhead_job)
            before = _connects
            start = time.perf_counter()
            result = dg.execute_job(recon, instance, run_config=run_config(n), raise_on_error=True)
            wall = time.perf_counter() - start
            conns = _connects - before
            assert result.success
            with result:
                pass
            events = len(instance.all_logs(result.run_id))
            steps = len(instance.get_run_step_stats(result.run_id))
        if variant == "bouncer":
            close_bouncer_connections(dbname)
        sessions = settled_sessions(dbname, timeout=15.0) if dbname else None
    return Result(variant, steps, wall, events, conns if variant != "sqlite" else None, sessions)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="mapped steps per run (default 200)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each variant once per round (default 1)")
    parser.add_argument("--variants", default="sqlite,stock,pooled",
                        help="comma-separated subset of sqlite,stock,pooled,bouncer (bouncer needs --pgbouncer)")
    parser.add_argument("--pgbouncer", type=int, metavar="PORT",
                        help="also run stock dagster-postgres through the PgBouncer on this port (variant bouncer)")
    args = parser.parse_args(argv)
    global PGBOUNCER_PORT
    PGBOUNCER_PORT = args.pgbouncer
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.pgbouncer and "bouncer" not in variants:
        variants.append("bouncer")
    if "bouncer" in variants and not args.pgbouncer:
        parser.error("variant bouncer needs --pgbouncer PORT")
    unknown = set(variants) - set(VARIANTS)
    if unknown or args.steps < 1 or args.repeat < 1:
        parser.error(f"bad arguments: unknown variants {sorted(unknown)}" if unknown else "--steps/--repeat must be >= 1")

    warnings.filterwarnings("ignore")
    logging.getLogger("dagster").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)

    print(f"# step_overhead: {args.steps} mapped steps (+ fan_out, total), in-process executor, "
          f"{args.repeat} round(s); dagster {dg.__version__}, sqlalchemy {sqlalchemy.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"# PostgreSQL {PG['host']}:{PG['port']} user {PG['user']}"
          f" ({'password' if PG['password'] else 'no password'})"
          + (f"; PgBouncer on port {PGBOUNCER_PORT}" if PGBOUNCER_PORT else ""))
    run_variant("sqlite", 5)  # warm-up: imports, plan and op caches; not reported

    results: dict[str, list[Result]] = {v: [] for v in variants}
    for round_no in range(1, args.repeat + 1):
        for variant in variants:
            r = run_variant(variant, args.steps)
            results[variant].append(r)
            print(f"  round {round_no} {variant:<7} wall={r.wall_s:7.2f}s  ms/step={r.ms_per_step:6.1f}  "
                  f"events/step={r.events / r.steps:5.1f}  conns={_fmt(r.conns, 'd')}  "
                  f"sessions={_fmt(r.sessions, 'd')}", flush=True)

    print()
    print(f"{'variant':<8} {'steps':>6} {'wall_s':>8} {'ms/step':>8} {'events/step':>12} "
          f"{'conns/run':>10} {'conns/step':>11} {'pg_sessions':>12}")
    medians: dict[str, float] = {}
    for variant in variants:
        rs = results[variant]
        wall = statistics.median(r.wall_s for r in rs)
        ms = statistics.median(r.ms_per_step for r in rs)
        medians[variant] = ms
        conns = statistics.median(r.conns for r in rs) if rs[0].conns is not None else None
        sessions = [r.sessions for r in rs if r.sessions is not None]
        print(f"{variant:<8} {rs[0].steps:>6} {wall:>8.2f} {ms:>8.1f} {rs[0].events / rs[0].steps:>12.1f} "
              f"{_fmt(conns, '.0f'):>10} {_fmt(conns / rs[0].steps if conns is not None else None, '.2f'):>11} "
              f"{_fmt(statistics.median(sessions) if sessions else None, '.0f'):>12}")
    print("# conns = DBAPI connections opened during execute_job (SQLAlchemy pool 'connect' events, this process);")
    print("# pg_sessions = pg_stat_database.sessions of the variant's fresh database: set-up + run + dispose.")
    if "stock" in medians and "pooled" in medians:
        print(f"pooled_vs_stock={medians['pooled'] / medians['stock']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
