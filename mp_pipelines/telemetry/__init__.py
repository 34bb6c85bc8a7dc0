"""Traces, metrics and log format of model calls, steps and runs (OpenTelemetry, Prometheus), and the per-step
call tally that `mp-pipelines stats` reads back. No Dagster here: `factory/` opens step spans, `dagster_ext/`
the run span, `calls/telemetry.py` the call spans."""
