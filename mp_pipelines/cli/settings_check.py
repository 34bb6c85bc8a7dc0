"""Every MP_* environment variable of the package, in one place: those a run reads are checked before the run starts
(`check_settings`), so a bad value is a usage error (exit 2) naming the variable and what it may be, never a
failed run that blames the workflow. The others are listed in EXEMPT with the reason; a test greps the package
for MP_* names and fails on one that is in neither.

Inside a step (a run launched from the Dagster UI, a schedule, a sensor) the same readers raise SettingError, and
the step fails with the same sentence (`factory/ops.setting_failure`)."""

from __future__ import annotations

from collections.abc import Callable

from mp_pipelines.spec.size_limits import SettingError

# variable → a reader that raises SettingError when the variable's value cannot be used
CHECKS: dict[str, Callable[[], object]] = {}


def _size_limit(env: str) -> Callable[[], object]:
    def check() -> object:
        from mp_pipelines.spec.library import MAX_PROMPT_FILE_BYTES
        from mp_pipelines.spec.size_limits import (
            MAX_CELL_CHARS,
            MAX_INPUT_CHARS,
            MAX_PROMPT_CHARS,
            MAX_SPEC_BYTES,
            MAX_TABLE_BYTES,
            MAX_TABLE_ROWS,
        )

        limits = (MAX_INPUT_CHARS, MAX_TABLE_BYTES, MAX_TABLE_ROWS, MAX_CELL_CHARS, MAX_PROMPT_CHARS, MAX_SPEC_BYTES,
                  MAX_PROMPT_FILE_BYTES)
        return next(limit for limit in limits if limit.env == env).value()
    return check


def _llm_resource() -> object:
    from mp_pipelines.llm.resource import build_llm_resource

    return build_llm_resource()


def _prices() -> object:
    from mp_pipelines.calls.pricing import current_prices

    return current_prices()


def _retry_delay() -> object:
    from mp_pipelines.calls.retry import retry_budget

    return retry_budget(None)


def _circuit_cooldown() -> object:
    from mp_pipelines.calls.circuit import cooldown_setting

    return cooldown_setting()


def _batch_numbers() -> object:
    from mp_pipelines.calls.batch_send import check_settings as check_batch_settings

    check_batch_settings()
    return None


def _simulated_batch_seconds() -> object:
    from mp_pipelines.llm.simulated_batches import simulated_batch_seconds

    return simulated_batch_seconds()


def _fleet_mode() -> object:
    from mp_pipelines.factory.ops import fleet_mode

    return fleet_mode()


def _log_format() -> object:
    from mp_pipelines.telemetry.logs import json_logs

    return json_logs()


def _providers_file() -> object:
    from mp_pipelines.spec.problems import WorkflowValidationError
    from mp_pipelines.spec.providers import PROVIDERS_ENV, shared_providers

    try:
        return shared_providers()
    except WorkflowValidationError as exc:
        reason = "; ".join(" ".join(str(problem).split()) for problem in exc.problems)
        raise SettingError(f"{PROVIDERS_ENV} is not a usable providers file ({reason}); fix the file, or unset "
                           f"{PROVIDERS_ENV} to use only the providers workflows declare") from None


for _env in ("MP_MAX_INPUT_CHARS", "MP_MAX_TABLE_BYTES", "MP_MAX_TABLE_ROWS", "MP_MAX_CELL_CHARS", "MP_MAX_PROMPT_CHARS",
             "MP_MAX_SPEC_BYTES", "MP_MAX_PROMPT_FILE_BYTES"):
    CHECKS[_env] = _size_limit(_env)
for _env in ("MP_LLM_PROVIDER", "MP_DEFAULT_MODEL", "MP_SIMULATED_LATENCY", "MP_SIMULATED_FAILURE_RATE",
             "MP_MAX_IN_FLIGHT", "MP_REQUESTS_PER_MINUTE", "MP_TOKENS_PER_MINUTE"):
    CHECKS[_env] = _llm_resource
CHECKS.update({
    "MP_PRICES_FILE": _prices,
    "MP_RETRY_BASE_DELAY": _retry_delay,
    "MP_CIRCUIT_COOLDOWN": _circuit_cooldown,
    "MP_BATCH_MAX_LINES": _batch_numbers,
    "MP_BATCH_POLL_SECONDS": _batch_numbers,
    "MP_SIMULATED_BATCH_SECONDS": _simulated_batch_seconds,
    "MP_FLEET_LIMITS": _fleet_mode,
    "MP_LOG_FORMAT": _log_format,
    "MP_PROVIDERS_FILE": _providers_file,
})

_URL = "a URL that may hold credentials: checked when connecting, its value never printed"
_PATHS = "a folder or a list of folders: any text is a value, and a folder that is missing is reported where it is used"
# variable → why it is not checked before a run
EXEMPT: dict[str, str] = {
    "MP_CACHE_URL": _URL,
    "MP_LIMITS_REDIS_URL": _URL,
    "MP_CELERY_BROKER": _URL,
    "MP_CELERY_BACKEND": _URL,
    "MP_PROMETHEUS_PUSHGATEWAY": _URL,
    "MP_DAGSTER_URL": "read by the remote commands (launch, status, cancel, reload), not by a run",
    "MP_DAGSTER_USER": "read by the remote commands, not by a run",
    "MP_DAGSTER_PASSWORD": "a secret, read by the remote commands, not by a run",
    "MP_WORKFLOWS_PATH": _PATHS,
    "MP_PROMPTS_PATH": _PATHS,
    "MP_INPUT_ROOTS": _PATHS,
    "MP_LOCAL_RUN_DIR": _PATHS,
    "MP_STEP_STORAGE_DIR": _PATHS,
    "MP_INBOX_DIR": _PATHS,
    "MP_FAILURE_LOG": "a file path the failure sensor appends to, not read by a run",
    "MP_INBOX_MODE": "read by the inbox sensor, which reports a bad value in its tick, not by a run",
    "MP_INBOX_INTERVAL_SECONDS": "read by the inbox sensor when the code location loads, not by a run",
    "MP_INBOX_SETTLE_SECONDS": "read by the inbox sensor, which reports a bad value in its tick, not by a run",
    "MP_TRACE_CONTENT": "a flag: 1, true, yes or on turn it on, any other value leaves it off",
}


def check_settings() -> None:
    """SettingError, naming the variable, its value (unless it may be a secret) and what it may be, for the first
    MP_* variable a run reads whose value cannot be used."""
    seen: set[Callable[[], object]] = set()
    for check in CHECKS.values():
        if check not in seen:
            seen.add(check)
            check()
