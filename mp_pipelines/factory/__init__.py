"""Spec → Dagster: ops, fan-outs, loops, the job, asset specs, schedules and the names they use (`names.py`)."""
