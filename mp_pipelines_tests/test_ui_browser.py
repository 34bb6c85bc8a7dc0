"""The Dagster UI as a user drives it, in headless Chromium, against webserver + daemon on PostgreSQL.

Open the research_report job's Launchpad, type a run config with a topic into its YAML editor, launch,
watch the run succeed, then open the workflow's asset lineage graph and check that every task asset
and every edge between them is drawn. Screenshots of each stage go to the test's tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from mp_pipelines import definitions
from mp_pipelines_tests.postgres import temporary_database
from mp_pipelines_tests.services import (
    LOCATION,
    DagsterServices,
    dagster_services,
    pg_env,
    unavailable,
    wait_for,
    write_instance_config,
)

CHROMIUM = os.environ.get("MP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TOPIC = "browser-driven research"
RUN_CONFIG = {"ops": {"inputs": {"config": {"topic": TOPIC, "max_questions": 2}}},
              "execution": {"config": {"in_process": {}}}}
# Edges of the lineage graph are SVG paths from the right side of one node's box to the left side of the
# next (a few pixels short, for the arrow head). Returns the boxes of the named nodes and each edge's ends.
GRAPH_SCRIPT = """() => {
  const nodes = [...document.querySelectorAll('foreignObject')].map(fo => {
    const label = fo.querySelector('[class*="assetName"]');
    return label && {name: label.textContent.trim(), x: +fo.getAttribute('x'), y: +fo.getAttribute('y'),
                     w: +fo.getAttribute('width'), h: +fo.getAttribute('height')};
  }).filter(Boolean);
  const edges = [...document.querySelectorAll('path[marker-end]')].map(p => {
    const numbers = (p.getAttribute('d') || '').match(/-?[0-9.]+/g) || [];
    return numbers.length >= 4 && {x1: +numbers[0], y1: +numbers[1],
                                   x2: +numbers[numbers.length - 2], y2: +numbers[numbers.length - 1]};
  }).filter(Boolean);
  return {nodes, edges};
}"""


def require_browser() -> Any:
    """Playwright's sync API with Debian's Chromium; a skip locally, a failure under CI, when missing."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        problem, sync_playwright = f"the playwright package is not installed ({exc}); pip install -e '.[dev]'", None
    if problem is None and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        problem = f"Chromium not found at {CHROMIUM}; apt-get install -y chromium (.ci/run does)"
    if problem:
        unavailable(problem)
    return sync_playwright


@contextmanager
def ui_page() -> Iterator[Any]:
    """A page of Debian's Chromium (1600×1000, 60 s timeouts) that dismisses Dagster's one-time "join the
    community" dialog, which shows over whatever page comes first; the browser is closed after."""
    sync_playwright = require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.set_default_timeout(60_000)
            page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda button: button.click())
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServices]:
    """Webserver + daemon on a fresh PostgreSQL database with the production instance config."""
    require_browser()
    home = tmp_path_factory.mktemp("ui") / "dagster_home"
    write_instance_config(home)
    with temporary_database() as dbname, dagster_services(home, pg_env(dbname)) as services:
        yield services


def expected_lineage(workflow: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The asset names of a workflow and its edges (upstream, downstream), from the code location."""
    graph = definitions.defs().resolve_asset_graph()
    keys = [key for key in graph.get_all_asset_keys() if key.path[0] == workflow]
    edges = {(parent.path[1], key.path[1]) for key in keys for parent in graph.get(key).parent_keys}
    return {key.path[1] for key in keys}, edges


def drawn_edges(graph: dict[str, list[dict[str, float]]]) -> set[tuple[str, str]]:
    """Which node each drawn edge leaves and enters, matched by the geometry of the boxes."""

    def node_at(x: float, y: float, side: str) -> str | None:
        for node in graph["nodes"]:
            edge_x = node["x"] + node["w"] if side == "right" else node["x"]
            if abs(x - edge_x) <= 12 and node["y"] <= y <= node["y"] + node["h"]:
                return node["name"]
        return None

    found = set()
    for edge in graph["edges"]:
        source, target = node_at(edge["x1"], edge["y1"], "right"), node_at(edge["x2"], edge["y2"], "left")
        if source and target:
            found.add((source, target))
    return found


def test_launch_from_the_launchpad_and_see_the_lineage(ui: DagsterServices, tmp_path: Path) -> None:
    require_browser()  # before the work: skip or fail at once without a browser
    shots = tmp_path / "screenshots"
    shots.mkdir()
    names, edges = expected_lineage("research_report")
    assert {"inputs", "plan", "research", "draft", "critique", "revise", "refine", "report"} == names
    with ui_page() as page:
        # 1. the Launchpad of the job, its YAML config editor (CodeMirror) replaced by typed config
        page.goto(f"{ui.url}/locations/{LOCATION}/jobs/research_report/playground")
        page.locator(".CodeMirror").first.wait_for()
        page.get_by_text("Missing required config entry \"topic\"").first.wait_for()
        page.locator(".CodeMirror-code").first.click()
        page.keyboard.press("Control+A")
        page.keyboard.insert_text(yaml.safe_dump(RUN_CONFIG, sort_keys=False))  # typed, not auto-indented
        typed = page.evaluate("() => document.querySelector('.CodeMirror').CodeMirror.getValue()")
        assert yaml.safe_load(typed) == RUN_CONFIG
        page.get_by_text("Missing required config entry").first.wait_for(state="hidden")
        page.screenshot(path=str(shots / "1_launchpad.png"))

        # 2. launch; the UI moves to the run's page, which follows the run to success
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}"))
        run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
        wait_for(lambda: ui.run_status(run_id) in ("SUCCESS", "FAILURE", "CANCELED"), 240,
                 f"run {run_id} to finish", diagnostics=ui.diagnostics)
        assert ui.run_status(run_id) == "SUCCESS", ui.diagnostics()
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            page.get_by_text("RUN_SUCCESS").first.wait_for(timeout=20_000)
        except PlaywrightTimeout:
            # The run page's live event stream can stall on a loaded machine; a fresh load reads the
            # stored events (the run itself already succeeded, per GraphQL above).
            page.reload()
            page.get_by_text("RUN_SUCCESS").first.wait_for()
        page.get_by_text("Success", exact=True).first.wait_for()
        page.screenshot(path=str(shots / "2_run.png"))
        run = ui.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { runConfigYaml } } }",
                         {"id": run_id})["runOrError"]
        assert yaml.safe_load(run["runConfigYaml"])["ops"]["inputs"]["config"]["topic"] == TOPIC

        # 3. the workflow's asset lineage: every task asset, every edge
        page.goto(f"{ui.url}/locations/{LOCATION}/asset-groups/research_report")
        deadline = time.monotonic() + 90
        graph: dict[str, Any] = {"nodes": [], "edges": []}
        while time.monotonic() < deadline:  # the layout is computed in a web worker
            graph = page.evaluate(GRAPH_SCRIPT)
            if {n["name"] for n in graph["nodes"]} >= names and len(drawn_edges(graph)) >= len(edges):
                break
            page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "3_lineage.png"))
        assert {n["name"] for n in graph["nodes"]} == names, graph
        assert drawn_edges(graph) == edges, graph
    assert sorted(p.name for p in shots.iterdir()) == ["1_launchpad.png", "2_run.png", "3_lineage.png"]
