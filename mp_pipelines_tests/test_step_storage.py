"""Step storage keeps every run's values apart: a step reads what its own run (or the run it resumes) produced, never
a value another run of the same workflow stored later; only a subset reads an asset's latest materialization.

Runs use Dagster's real storage and the simulated model, which answers "[simulated] Response to: <prompt>".
"""

from __future__ import annotations

import pickle
from pathlib import Path

import dagster as dg

from mp_pipelines.cli.running import resume_run
from mp_pipelines.factory.resources import StepStorage
from mp_pipelines_tests.workflow_helpers import run_file, write_workflow

CHAIN = """
    name: chain
    inputs: {topic: {type: string}}
    tasks:
      - name: outline
        prompt: "Outline {{ inputs.topic }}"
      - name: expand
        prompt: "Expand: {{ outline }}"
      - name: polish
        prompt: "Polish: {{ expand }}"
"""


def test_a_resumed_run_reads_its_own_upstream_values_not_a_later_runs(
        instance: dg.DagsterInstance, tmp_path: Path) -> None:
    """Run A stops at `polish` (budget), run B of the same workflow then succeeds with another topic, and resuming A
    must finish from A's `expand`: B's is the asset's latest value, but not A's."""
    path = write_workflow(tmp_path, CHAIN)
    first = run_file(path, {"topic": "tides"}, instance, budget={"max_calls": 2})
    assert not first.success and first.tasks["polish"]["status"] != "success", first.as_text()
    second = run_file(path, {"topic": "moons"}, instance)
    assert second.success, second.as_text()
    assert "moons" in second.tasks["polish"]["output"]

    resumed = resume_run(first.run_id, instance=instance, budget={"max_calls": 10})
    assert resumed.success, resumed.as_text()
    assert "tides" in resumed.tasks["polish"]["output"] and "moons" not in resumed.tasks["polish"]["output"]
    assert "tides" in resumed.tasks["expand"]["output"]  # the summary reports the resumed run's values too


def test_outputs_of_two_runs_and_of_each_dynamic_item_are_stored_apart(tmp_path: Path) -> None:
    """The IO manager alone, through Dagster's own contexts: per run, per step, per mapping key; the asset's
    published value is the last one written, replaced whole."""
    key = dg.AssetKey(["chain", "expand"])
    with dg.build_resources({"io_manager": StepStorage(base_dir=str(tmp_path))}) as resources:
        storage = resources.io_manager
        for run_id, value in (("run-a", "from a"), ("run-b", "from b")):
            storage.handle_output(dg.build_output_context(run_id=run_id, step_key="chain__expand", name="result",
                                                          asset_key=key), value)
            for item in ("0", "1"):
                storage.handle_output(dg.build_output_context(run_id=run_id, step_key="chain__fan.t__items",
                                                              name="items", mapping_key=item), f"{value} item {item}")

        def load(upstream: dg.OutputContext, asset_key: dg.AssetKey | None = None) -> object:
            return storage.load_input(dg.build_input_context(upstream_output=upstream, asset_key=asset_key))

        assert load(dg.build_output_context(run_id="run-a", step_key="chain__expand", name="result"), key) == "from a"
        assert load(dg.build_output_context(run_id="run-b", step_key="chain__expand", name="result"), key) == "from b"
        assert load(dg.build_output_context(run_id="run-a", step_key="chain__fan.t__items", name="items",
                                            mapping_key="1")) == "from a item 1"
        assert load(dg.build_output_context(asset_key=key), key) == "from b"  # not produced in this run: the latest
    assert pickle.loads((tmp_path / "chain" / "expand").read_bytes()) == "from b"
    assert not [p for p in tmp_path.rglob(".*")], "no temporary file is left behind"


def test_an_asset_never_materialized_is_one_sentence(tmp_path: Path) -> None:
    key = dg.AssetKey(["chain", "outline"])
    with dg.build_resources({"io_manager": StepStorage(base_dir=str(tmp_path))}) as resources:
        try:
            resources.io_manager.load_input(dg.build_input_context(
                upstream_output=dg.build_output_context(asset_key=key), asset_key=key))
        except dg.Failure as failure:
            assert "asset chain/outline has never been materialized" in str(failure.description)
            assert "mp-pipelines run chain" in str(failure.description)
        else:
            raise AssertionError("loading a value nobody stored must fail")
