"""`list`, `validate` and `show` read workflow files only: they must not import Dagster, openai or pandas (each
costs a second or more of start-up; benchmarks/cli_overhead.py times the commands)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("dagster", "openai", "pandas", "sqlalchemy")

PROBE = (
    "import runpy, sys\ncode = 0\n"
    "sys.argv = ['mp-pipelines', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('mp_pipelines.cli', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), 'EXIT=' + str(code), file=sys.stderr)\n"
)


@pytest.mark.parametrize("command", [["list"], ["validate"], ["show", "research_report"]])
def test_light_commands_do_not_import_dagster_openai_or_pandas(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, timeout=120)
    probe = [line for line in done.stderr.splitlines() if line.startswith("HEAVY=")]
    assert probe, done.stderr[-2000:]
    heavy, code = probe[-1].split(" ")
    assert code == "EXIT=0", done.stderr[-2000:]
    assert done.stdout.strip(), "the command printed nothing"
    assert heavy == "HEAVY=", f"`mp-pipelines {' '.join(command)}` imported {heavy[len('HEAVY='):]}"
