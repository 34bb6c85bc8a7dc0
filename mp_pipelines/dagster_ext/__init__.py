"""The quarantine for Dagster internals: the only package of mp_pipelines allowed to import `dagster._*`.

* `executor`: `concurrent_executor` / `selectable_executor`, the steps of a run on threads
  (`step_threads`: one step's thread and the outputs it has stored), Dagster's multiprocess one on a
  forkserver of the current environment (`forkserver`);
* `postgres`: dagster-postgres storages on pooled connections (re-exported by `mp_pipelines.storage`,
  the module users name in dagster.yaml), on the process-safe shared engines of `pg_engines`;
* `compat`: the Dagster version this was written against and every private name used here, with the
  checks run by mp_pipelines_tests/test_architecture.py (and `python -m mp_pipelines.dagster_ext.compat`).

Nothing is imported here, so that `compat` can be read without importing Dagster.
"""
