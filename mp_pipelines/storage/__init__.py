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

This module only re-exports them: they live in `mp_pipelines.dagster_ext.postgres`, with the other code
that relies on Dagster internals. Keep the names below importable from here (deploy/dagster.yaml and
users' instance configs name `mp_pipelines.storage`).
"""

from mp_pipelines.dagster_ext.postgres import (
    PooledPostgresEventLogStorage,
    PooledPostgresRunStorage,
    PooledPostgresScheduleStorage,
    PooledPostgresStorage,
    PoolSettings,
)

__all__ = [
    "PoolSettings",
    "PooledPostgresEventLogStorage",
    "PooledPostgresRunStorage",
    "PooledPostgresScheduleStorage",
    "PooledPostgresStorage",
]
