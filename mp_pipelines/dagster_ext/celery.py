"""Steps on a Celery worker fleet, through dagster-celery (0.29.27, the release of Dagster 1.13.27).

The executor is dagster-celery's `celery_executor`; the workers run its `execute_plan` task. What this module
adds is where both sides get their settings, so that the run and the workers always agree:

* broker and result backend from `MP_CELERY_BROKER` / `MP_CELERY_BACKEND` (a run's config may name them too);
  the backend defaults to the broker when that is Redis, else to `rpc://` (RabbitMQ);
* the same Celery settings on both sides (`FLEET_SETTINGS`): a step is acknowledged only after it ran and is
  put back on the queue when the worker process running it dies, so another worker runs it. dagster-celery
  does not apply a step's RetryPolicy when a worker dies (the task just fails), and without these settings
  such a run would fail with that step lost.

`mp-pipelines worker` (or `celery -A mp_pipelines.dagster_ext.celery_worker worker`) starts a worker. Read
against dagster-celery 0.29.27 (`executor.py`, `core_execution_loop.py`, `make_app.py`, `tasks.py`, `cli.py`);
only its public modules are imported here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import dagster as dg

CELERY_BROKER_ENV = "MP_CELERY_BROKER"
CELERY_BACKEND_ENV = "MP_CELERY_BACKEND"
QUEUE = "dagster"  # dagster-celery's queue (make_app.py): the executor sends every step there

# Celery settings of the executor's app and of every worker's app (the names of Celery's configuration).
FLEET_SETTINGS: dict[str, Any] = {
    "task_acks_late": True,  # a step's message is acknowledged when the step has run ...
    "task_reject_on_worker_lost": True,  # ... and re-queued when the worker process running it dies
    "worker_prefetch_multiplier": 1,  # a worker reserves no step it cannot start (others could run it)
    "broker_connection_retry_on_startup": True,
}

CELERY_EXECUTOR_CONFIG: dict[str, Any] = {
    "broker": dg.Field(dg.Noneable(dg.StringSource), is_required=False, default_value=None,
                       description=f"Celery broker URL (default: ${CELERY_BROKER_ENV}). Prefer the environment: "
                                   "a URL with a password in run config is stored with the run."),
    "backend": dg.Field(dg.Noneable(dg.StringSource), is_required=False, default_value=None,
                        description=f"Celery result backend URL (default: ${CELERY_BACKEND_ENV}, else the broker "
                                    "when it is Redis, else rpc://)."),
    "config_source": dg.Field(dg.Noneable(dg.Permissive()), is_required=False, default_value=None,
                              description="More Celery settings, over the fleet's (the workers need the same)."),
}


class CeleryNotConfigured(ValueError):
    """No broker was named for the Celery executor or a worker."""


def broker_url(configured: str | None = None) -> str:
    """The broker: `configured` (run config) or `MP_CELERY_BROKER`; a clear error when neither is set."""
    url = (configured or os.environ.get(CELERY_BROKER_ENV, "")).strip()
    if not url:
        raise CeleryNotConfigured(
            f"the Celery executor needs a broker: set {CELERY_BROKER_ENV} (e.g. redis://127.0.0.1:6379/0 or "
            "amqp://guest:guest@127.0.0.1:5672//) for the run and for every worker")
    return url


def backend_url(broker: str, configured: str | None = None) -> str:
    """The result backend: `configured`, `MP_CELERY_BACKEND`, the broker when it is Redis, else rpc://."""
    url = (configured or os.environ.get(CELERY_BACKEND_ENV, "")).strip()
    if url:
        return url
    return broker if broker.startswith(("redis://", "rediss://")) else "rpc://"


def app_settings(config_source: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**FLEET_SETTINGS, **(config_source or {})}


def celery_fleet_executor(init_context: dg.InitExecutorContext, options: dict[str, Any]) -> dg.Executor:
    """dagster-celery's executor with the broker, backend and settings of the fleet."""
    from dagster_celery import celery_executor

    # dagster-celery registers its task again for every step it submits (executor.py `_submit_task`); Celery
    # warns each time that the name is taken, which is harmless (the same task) and only noise in a run's output.
    warnings.filterwarnings("ignore", message="Task name 'execute_plan' is already registered")
    try:
        broker = broker_url(options.get("broker"))
    except CeleryNotConfigured as exc:
        raise dg.DagsterInvalidConfigError(str(exc), [], options) from None
    config = {"broker": broker, "backend": backend_url(broker, options.get("backend")),
              "config_source": app_settings(options.get("config_source")),
              "retries": options.get("retries") or {"enabled": {}}}
    return celery_executor.executor_creation_fn(  # type: ignore[misc]
        dg.InitExecutorContext(job=init_context.job, executor_def=celery_executor, executor_config=config,
                               instance=init_context.instance))


def make_worker_app() -> Any:
    """The Celery app of a worker: dagster-celery's `execute_plan` task on the fleet's broker and settings."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    broker = broker_url()
    app = make_app(CeleryExecutor.for_cli(broker=broker, backend=backend_url(broker),
                                          config_source=app_settings()).app_args())
    create_task(app)
    return app
