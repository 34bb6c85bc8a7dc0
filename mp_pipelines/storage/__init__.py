"""Instance storage for mp-pipelines: dagster-postgres with pooled connections.

Enable it in dagster.yaml (see docs/performance.md, "PostgreSQL per-step cost")::

    storage:
      custom:
        module: mp_pipelines.storage
        class: PooledPostgresStorage
        config:
          postgres_db: {hostname: ..., username: ..., password: ..., db_name: ..., port: 5432}
          pool_size: 5

or per storage with `run_storage:` / `event_log_storage:` / `schedule_storage:` and the classes below.

This module only re-exports them: they live in `mp_pipelines.dagster_ext.postgres` (`PoolSettings`, with
the pooled engines, in `mp_pipelines.dagster_ext.pg_engines`), with the other code that relies on Dagster
internals. Keep the names below importable from here (deploy/dagster.yaml and
users' instance configs name `mp_pipelines.storage`).
"""

from mp_pipelines.dagster_ext.pg_engines import PoolSettings
from mp_pipelines.dagster_ext.postgres import (
    PooledPostgresEventLogStorage,
    PooledPostgresRunStorage,
    PooledPostgresScheduleStorage,
    PooledPostgresStorage,
)

__all__ = [
    "PoolSettings",
    "PooledPostgresEventLogStorage",
    "PooledPostgresRunStorage",
    "PooledPostgresScheduleStorage",
    "PooledPostgresStorage",
]
