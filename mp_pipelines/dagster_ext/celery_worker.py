"""The Celery app of an mp-pipelines worker, for `celery -A mp_pipelines.dagster_ext.celery_worker worker`.

`mp-pipelines worker` starts the same app. The broker and backend come from `MP_CELERY_BROKER` /
`MP_CELERY_BACKEND` (see `celery.py`); the worker also needs the run's environment (`DAGSTER_HOME`, the
workflow files, `MP_STEP_STORAGE_DIR`, the model's endpoint and key).
"""

from mp_pipelines.dagster_ext.celery import make_worker_app

app = make_worker_app()
