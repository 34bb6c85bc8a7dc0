"""Screenshots of the Dagster UI for README.md, taken offline with the simulated model.

Starts the real `dagster-webserver` (no daemon) of this checkout on a throw-away SQLite instance in a temp folder,
with an extra workflow folder (MP_WORKFLOWS_PATH) holding `gated` (from mp_pipelines_tests/test_assets_native.py):
its task `headline` has a blocking error check, `matches: ^Headline:`, that the simulated answers cannot pass.
Runs `research_report` and `gated` with `python -m mp_pipelines.cli run` against that instance, then drives
headless Chromium (/usr/bin/chromium, or $MP_CHROMIUM) through playwright's sync API and writes, at 1280x800,
into docs/images/:

- assets_lineage.png    research_report's asset lineage after the run (its first five columns, zoomed in far
                        enough for Dagster to draw each node's latest event and its "Materialized" status)
- asset_item_table.png  the `research` fan-out asset's latest materialization: its item table (index, item,
                        status, answer, tokens, cost_usd)
- check_failed.png      the Checks tab of gated/headline: the blocking check `starts_with_headline` Failed

Run from the repository root: `python docs/screenshots.py`. Needs the `playwright` package and Debian's Chromium;
downloads nothing, needs no network. Everything but the PNGs is deleted afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mp_pipelines_tests.services import LOCATION, dagster_services  # noqa: E402
from mp_pipelines_tests.test_assets_native import GATED  # noqa: E402
from mp_pipelines_tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from mp_pipelines_tests.workflow_helpers import write_workflow  # noqa: E402

IMAGES = REPO / "docs" / "images"
VIEWPORT = {"width": 1280, "height": 800}


def run(env: dict[str, str], *args: str) -> dict:
    """`mp-pipelines run ... --json` of this checkout against the instance; its JSON summary."""
    done = subprocess.run([sys.executable, "-m", "mp_pipelines.cli", "run", *args, "--json"], cwd=REPO,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, 1):
        raise SystemExit(f"mp-pipelines run {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    from playwright.sync_api import sync_playwright

    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mp_screenshots_") as tmp:
        home, workflows = Path(tmp) / "dagster_home", Path(tmp) / "workflows"
        home.mkdir()
        workflows.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # SQLite storage in `home`
        write_workflow(workflows, GATED)
        env = {"MP_WORKFLOWS_PATH": str(workflows), "PYTHONPATH": str(REPO)}  # this checkout's code location
        with dagster_services(home, env, daemon=False) as services:
            report = run(services.env, "research_report", "--input", "topic=tides", "--input", "max_questions=3")
            assert report["status"] == "success", report
            gated = run(services.env, "gated")
            assert gated["status"] == "failure", gated
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_context(viewport=VIEWPORT).new_page()
                    page.set_default_timeout(60_000)
                    for shoot in (shoot_lineage, shoot_item_table, shoot_failed_check):
                        shoot(page, services.url)
                finally:
                    browser.close()
    for name in ("assets_lineage.png", "asset_item_table.png", "check_failed.png"):
        print(IMAGES / name, (IMAGES / name).stat().st_size, "bytes")


def skip_dialog(page) -> None:
    """Dagster shows a one-time "join the community" dialog over the first page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Skip").first.click(timeout=3000)
    except PlaywrightTimeout:
        pass  # shown already (once per browser profile)


def shoot_lineage(page, url: str) -> None:
    page.goto(f"{url}/locations/{LOCATION}/asset-groups/research_report")
    for name in ("plan", "research", "report"):
        page.locator("foreignObject", has_text=name).first.wait_for()
    page.wait_for_timeout(1500)
    skip_dialog(page)
    page.get_by_text("Hide navigation").click()  # more room for the graph (kept for the other pages)
    zoom_in = page.locator("button:has(svg)").filter(has=page.locator('[aria-label="zoom_in"]'))
    for _ in range(6):  # up to the zoom level that draws each node's status rows
        zoom_in.first.click() if zoom_in.count() else page.mouse.click(1252, 480)
        page.wait_for_timeout(400)
    page.mouse.move(500, 250)  # pan right: the graph's first columns into view
    page.mouse.down()
    page.mouse.move(1010, 250, steps=10)
    page.mouse.up()
    page.get_by_text("Materialized").first.wait_for()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(IMAGES / "assets_lineage.png"))


def shoot_item_table(page, url: str) -> None:
    page.goto(f"{url}/assets/research_report/research?view=events")  # the latest materialization's metadata
    row = page.locator("tr", has_text="item_table").first
    row.wait_for()
    skip_dialog(page)
    row.evaluate("row => row.scrollIntoView({block: 'start'})")  # the table's header at the top
    page.wait_for_timeout(1000)
    page.screenshot(path=str(IMAGES / "asset_item_table.png"))


def shoot_failed_check(page, url: str) -> None:
    page.goto(f"{url}/assets/gated/headline?view=checks")
    page.get_by_text("This is a blocking asset check").first.wait_for()
    skip_dialog(page)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(IMAGES / "check_failed.png"))


if __name__ == "__main__":
    main()
