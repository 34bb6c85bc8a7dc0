"""Every attribute, event and metric name that telemetry writes, in one table.

The OpenTelemetry GenAI conventions are marked "Development" and have been renamed before: the default
names are those of semantic conventions v1.36 (what backends read today, e.g. `gen_ai.system`); with
`OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental` the latest ones (e.g. `gen_ai.provider.name`).
Cost has no convention: it is the project attribute `mp.cost_usd`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
LATEST_OPT_IN = "gen_ai_latest_experimental"
CONTENT_ENV = "MP_TRACE_CONTENT"  # "1": prompt and answer text on call spans (never by default)
PUSHGATEWAY_ENV = "MP_PROMETHEUS_PUSHGATEWAY"
LOG_FORMAT_ENV = "MP_LOG_FORMAT"
OPERATION = "chat"  # gen_ai.operation.name of every call the project makes

# key: (v1.36 name, latest experimental name)
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "operation": ("gen_ai.operation.name", "gen_ai.operation.name"),
    "provider": ("gen_ai.system", "gen_ai.provider.name"),
    "request_model": ("gen_ai.request.model", "gen_ai.request.model"),
    "response_model": ("gen_ai.response.model", "gen_ai.response.model"),
    "temperature": ("gen_ai.request.temperature", "gen_ai.request.temperature"),
    "max_tokens": ("gen_ai.request.max_tokens", "gen_ai.request.max_tokens"),
    "input_tokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.input_tokens"),
    "output_tokens": ("gen_ai.usage.output_tokens", "gen_ai.usage.output_tokens"),
    "finish_reasons": ("gen_ai.response.finish_reasons", "gen_ai.response.finish_reasons"),
    "output_type": ("gen_ai.output.type", "gen_ai.output.type"),
    "error_type": ("error.type", "error.type"),
    "http_status": ("http.response.status_code", "http.response.status_code"),
    "token_type": ("gen_ai.token.type", "gen_ai.token.type"),
    # prompt and answer text (MP_TRACE_CONTENT=1): v1.36 records them as events, the latest as attributes
    "input_messages": ("gen_ai.user.message", "gen_ai.input.messages"),
    "output_messages": ("gen_ai.choice", "gen_ai.output.messages"),
}

# Project attributes (no convention covers them); the same in both versions.
COST = "mp.cost_usd"
CACHE_HIT = "mp.cache_hit"
CALLS = "mp.calls"  # model answers behind this call span (a repaired answer counts each call)
HTTP_ATTEMPTS = "mp.http_attempts"
RATE_LIMITED = "mp.rate_limited"  # HTTP 429 responses the call met
WORKFLOW = "mp.workflow"
TASK = "mp.task"
LABEL = "mp.label"  # e.g. research[3]
RUN_ID = "mp.run_id"
JOB = "mp.job"
STEP = "mp.step_key"
STATUS = "mp.status"  # of an item: success | failed
FAILED_STEPS = "mp.failed_steps"  # on the run span

# Span events
EVENT_RETRY = "mp.retry"  # an HTTP response that the client retried (status, Retry-After)
EVENT_BUDGET_STOP = "mp.budget_stop"
EVENT_CACHE_HIT = "mp.cache_hit"

# OpenTelemetry metrics: GenAI names where a convention exists.
OTEL_TOKEN_USAGE = "gen_ai.client.token.usage"  # histogram, {token}, by gen_ai.token.type input|output
OTEL_DURATION = "gen_ai.client.operation.duration"  # histogram, s
OTEL_COUNTERS: dict[str, tuple[str, str]] = {  # key: (name, unit)
    "calls": ("mp.llm.calls", "{call}"),
    "cost": ("mp.llm.cost", "USD"),
    "errors": ("mp.llm.errors", "{error}"),
    "retries": ("mp.llm.retries", "{retry}"),
    "rate_limited": ("mp.llm.rate_limited", "{response}"),
    "waits": ("mp.llm.rate_limit.wait", "s"),
    "cache_hits": ("mp.llm.cache_hits", "{hit}"),
    "budget_stops": ("mp.llm.budget_stops", "{call}"),
    "items": ("mp.llm.items", "{item}"),
}
TOKEN_TYPES = {"input": ("input", "prompt"), "output": ("output", "completion")}  # (OTel value, Prometheus value)

# Prometheus (prometheus_client adds `_total` to counters): name without `_total`, help text.
PROMETHEUS_LABELS = ("workflow", "task", "model", "provider")
PROMETHEUS: dict[str, tuple[str, str]] = {
    "calls": ("mp_llm_calls", "Model answers (cache hits are not calls)."),
    "tokens": ("mp_llm_tokens", "Tokens of model answers, by type (prompt or completion)."),
    "cost": ("mp_llm_cost_usd", "US dollars of model answers (price table)."),
    "duration": ("mp_llm_call_duration_seconds", "Seconds per model answer, client retries included."),
    "errors": ("mp_llm_errors", "Failed calls, by kind (rate_limit, timeout, server_error, budget, ...)."),
    "retries": ("mp_llm_retries", "HTTP attempts beyond the first."),
    "rate_limited": ("mp_llm_rate_limited", "HTTP 429 responses."),
    "waits": ("mp_llm_rate_limit_wait_seconds", "Seconds of Retry-After asked by 429 responses."),
    "cache_hits": ("mp_llm_cache_hits", "Answers taken from the response cache or a checkpoint."),
    "budget_stops": ("mp_llm_budget_stops", "Calls refused because the run's budget was spent."),
    "items": ("mp_llm_items", "Fan-out items and plain tasks finished, by status."),
}
PUSH_JOB = "mp_pipelines"  # Pushgateway grouping key: {job="mp_pipelines", instance="<host>-<pid>"}


@dataclass(frozen=True)
class Names:
    """The attribute names of one semantic-conventions version (`names()` picks it from the environment)."""

    latest: bool

    def __getitem__(self, key: str) -> str:
        return ATTRIBUTES[key][1 if self.latest else 0]


def latest_opted_in(value: str | None = None) -> bool:
    """Whether OTEL_SEMCONV_STABILITY_OPT_IN (a comma-separated list) asks for the latest GenAI names."""
    value = os.environ.get(OPT_IN_ENV, "") if value is None else value
    return LATEST_OPT_IN in {part.strip() for part in value.split(",")}


def names() -> Names:
    return Names(latest_opted_in())
