"""Shared pytest fixtures. Keep them generic: add new ones below, each with a one-line docstring."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from mp_pipelines_tests.fault_server import RunningServer, run_server


@pytest.fixture(scope="session")
def _shared_llm_server() -> Iterator[RunningServer]:
    """One loopback server for the whole session; `llm_server` hands it out clean to each test."""
    with run_server() as server:
        yield server


@pytest.fixture
def llm_server(_shared_llm_server: RunningServer) -> Iterator[RunningServer]:
    """A running loopback OpenAI-compatible server (simulated model, no latency), empty fault script and log."""
    _shared_llm_server.reset()
    yield _shared_llm_server
    _shared_llm_server.reset()


@pytest.fixture
def llm_server_factory() -> Iterator[Callable[..., RunningServer]]:
    """Start extra servers with their own model, faults or api_key: `llm_server_factory(model=...)`."""
    with ExitStack() as stack:

        def start(**kwargs: Any) -> RunningServer:
            return stack.enter_context(run_server(**kwargs))

        yield start


@pytest.fixture
def instance(tmp_path: Any) -> Iterator[Any]:
    """A persistent local Dagster instance (SQLite) in a temporary folder."""
    import dagster as dg

    (tmp_path / "dagster_home").mkdir()
    with dg.DagsterInstance.local_temp(
        str(tmp_path / "dagster_home"), overrides={"telemetry": {"enabled": False}}
    ) as inst:
        yield inst


@pytest.fixture
def openai_env(llm_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """Point the LLM resource at the loopback server as a real (openai) provider with a fake key."""
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    return llm_server


@pytest.fixture(autouse=True)
def _no_ambient_input_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input roots are the defaults unless a test sets MP_INPUT_ROOTS; `mp-pipelines run` invoked in this process
    sets MP_LOCAL_RUN_DIR, which is undone after each test (set first so that monkeypatch restores it)."""
    for name in ("MP_INPUT_ROOTS", "MP_LOCAL_RUN_DIR"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _no_ambient_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their provider themselves: drop any endpoint settings from the outer environment."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "MP_LLM_PROVIDER",
        "MP_WORKFLOWS_PATH",
        "MP_SIMULATED_LATENCY",
        "MP_SIMULATED_FAILURE_RATE",
        "MP_MAX_IN_FLIGHT",
        "MP_REQUESTS_PER_MINUTE",
        "MP_TOKENS_PER_MINUTE",
        "MP_CACHE_URL",
        "MP_PRICES_FILE",
        "MP_MAX_INPUT_CHARS",
        "MP_MAX_TABLE_BYTES",
        "MP_MAX_TABLE_ROWS",
        "MP_MAX_CELL_CHARS",
        "MP_MAX_PROMPT_CHARS",
        "MP_MAX_SPEC_BYTES",
        "MP_PROMPTS_PATH",
        "MP_MAX_PROMPT_FILE_BYTES",
        "MP_CELERY_BROKER",
        "MP_CELERY_BACKEND",
        "MP_STEP_STORAGE_DIR",
        "MP_LIMITS_REDIS_URL",
        "MP_FLEET_LIMITS",
        "DAGSTER_HOME",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pg_instance(tmp_path: Any) -> Iterator[Any]:
    """A Dagster instance whose runs, events and schedules live in a fresh PostgreSQL database."""
    import dagster as dg

    from mp_pipelines_tests.postgres import postgres_storage_config, temporary_database

    with temporary_database() as dbname:
        home = tmp_path / "pg_home"
        home.mkdir()
        overrides = {"storage": postgres_storage_config(dbname), "telemetry": {"enabled": False}}
        with dg.DagsterInstance.local_temp(str(home), overrides=overrides) as instance:
            yield instance
