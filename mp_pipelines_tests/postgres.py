"""A throw-away PostgreSQL database for tests that need Dagster's PostgreSQL storage.

When the server is unreachable the tests skip locally, but fail under CI (CI=true), where
`.ci/run` starts PostgreSQL and a skip would hide a broken set-up.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG = {
    "host": os.environ.get("DAGSTER_PG_HOST", "127.0.0.1"),
    "port": int(os.environ.get("DAGSTER_PG_PORT", "5432")),
    "user": os.environ.get("DAGSTER_PG_USER", "postgres"),
    "password": os.environ.get("DAGSTER_PG_PASSWORD", ""),
}


def admin_connection(dbname: str = "postgres"):
    """An autocommit psycopg2 connection to `dbname` with the PG settings above."""
    import psycopg2

    connection = psycopg2.connect(dbname=dbname, connect_timeout=5, **PG)
    connection.autocommit = True
    return connection


def settled_sessions(dbname: str, timeout: float = 30.0) -> int | None:
    """Sessions ever opened on `dbname`, once no backend is connected and the figure is stable
    (a backend's session count reaches the cumulative statistics by the time it has exited);
    None if that did not happen within `timeout` seconds."""
    admin = admin_connection()
    try:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            with admin.cursor() as cursor:
                cursor.execute("SELECT pg_stat_clear_snapshot()")
                cursor.execute("SELECT numbackends, sessions FROM pg_stat_database WHERE datname = %s", (dbname,))
                backends, sessions = cursor.fetchone()
            if backends == 0 and sessions is not None and sessions == last:
                return int(sessions)
            if time.monotonic() > deadline:
                return None
            last = sessions
            time.sleep(0.25)
    finally:
        admin.close()


@contextmanager
def temporary_database() -> Iterator[str]:
    """Create a fresh database, yield its name, drop it afterwards."""
    import psycopg2

    try:
        admin = admin_connection()
    except psycopg2.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG['host']}:{PG['port']} is required under CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG['host']}:{PG['port']}: {exc}")
    name = f"mp_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_storage_config(dbname: str) -> dict:
    """Instance `storage:` config pointing runs, events and schedules at `dbname`."""
    return {"postgres": {"postgres_db": {"hostname": PG["host"], "port": PG["port"], "username": PG["user"],
                                         "password": PG["password"], "db_name": dbname}}}
