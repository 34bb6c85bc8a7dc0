"""A small fan-out job for the storage tests, importable by module name so that Dagster's multiprocess
executor can reconstruct it in its step processes (`dg.reconstructable(fanout_job)`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import dagster as dg

ITEMS = 3
DATA_VERSION_TAG = "dagster/data_version"


@dg.op(out=dg.DynamicOut(int))
def fan_out() -> Iterator[dg.DynamicOutput[int]]:
    for i in range(ITEMS):
        yield dg.DynamicOutput(i, mapping_key=f"item_{i}")


@dg.op
def square(x: int) -> Iterator[dg.AssetMaterialization | dg.Output[int]]:
    # the pid shows which process ran the step (the multiprocess test checks they differ)
    # a data version tag is indexed by the event log (`asset_event_tags`), a separate write path
    yield dg.AssetMaterialization(asset_key=["pg_storage_test", "item"], metadata={"x": x, "pid": os.getpid()},
                                  tags={DATA_VERSION_TAG: f"v{x}"})
    yield dg.Output(x * x)


@dg.op
def total(values: list[int]) -> Iterator[dg.AssetMaterialization | dg.Output[int]]:
    result = sum(values)
    yield dg.AssetMaterialization(asset_key=["pg_storage_test", "total"], metadata={"total": result})
    yield dg.Output(result)


@dg.job
def fanout_job() -> None:
    total(fan_out().map(square).collect())


EXPECTED_TOTAL = sum(i * i for i in range(ITEMS))
STEPS = ITEMS + 2
