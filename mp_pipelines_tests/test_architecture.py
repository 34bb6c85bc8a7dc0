"""The package's architecture: import contracts, the quarantine of Dagster internals, and the parts of
spec/ that stand in for Dagster (cron strings, reserved names)."""

from __future__ import annotations

import ast
import configparser
import inspect
import keyword
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mp_pipelines.dagster_ext import compat
from mp_pipelines.spec.models import DAGSTER_RESERVED_NAMES, ScheduleSpec, check_name, is_valid_cron

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mp_pipelines"
QUARANTINE = PACKAGE / "dagster_ext"
# Top-level packages whose underscore modules are private (no API promise across versions).
PRIVATE_ROOTS = ("dagster", "openai")


# --------------------------------------------------------------------------------------------------
# Private imports stay in mp_pipelines/dagster_ext/
# --------------------------------------------------------------------------------------------------


def _is_private(module: str) -> bool:
    """True for `dagster._core...`, `openai._constants`, ...: a private module of a PRIVATE_ROOTS package."""
    root, _, rest = module.partition(".")
    return root in PRIVATE_ROOTS and rest.startswith("_")


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def private_imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, what) for each import of a private Dagster / openai module or name in `source`: `import
    dagster._x`, `from dagster._x import y`, `from dagster import _x`, and `importlib.import_module` /
    `__import__` called with such a module name as a literal string."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names if _is_private(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _is_private(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module in PRIVATE_ROOTS:
                found += [(node.lineno, f"from {node.module} import {alias.name}")
                          for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            target = _literal(node.args[0])
            if name in ("import_module", "__import__") and target and _is_private(target):
                found.append((node.lineno, f"{name}({target!r})"))
    return found


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_the_detector_sees_every_form_of_private_import() -> None:
    source = "\n".join([
        "import dagster._core.events",
        "import dagster as dg, openai._client as oc",
        "from dagster._utils.schedules import is_valid_cron_string",
        "from dagster import _check, asset",
        "from openai._constants import DEFAULT_CONNECTION_LIMITS",
        "import importlib",
        "importlib.import_module('dagster._core.storage')",
        "from importlib import import_module",
        "import_module('openai._base_client')",
        "__import__('dagster._serdes')",
        # allowed:
        "import dagster",
        "from dagster import asset, Definitions",
        "from dagster_postgres import PostgresEventLogStorage",
        "from openai import OpenAI",
        "from . import _private",
        "importlib.import_module('dagster')",
        "x = 'dagster._core'",
    ])
    assert [line for line, _ in private_imports(source)] == [1, 2, 3, 4, 5, 7, 9, 10]


def test_only_dagster_ext_imports_private_dagster_or_openai_modules() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in _modules() if QUARANTINE not in path.parents
        for line, what in private_imports(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not offenders, (
        "private Dagster / openai imports outside mp_pipelines/dagster_ext/ (move the code there, or use a "
        "public API):\n" + "\n".join(offenders)
    )


# --------------------------------------------------------------------------------------------------
# import-linter contracts
# --------------------------------------------------------------------------------------------------


def _contract_names() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter", encoding="utf-8")
    return [config[section]["name"] for section in config.sections() if section.startswith("importlinter:contract:")]


def test_import_contracts_are_kept() -> None:
    names = _contract_names()
    assert len(names) >= 3, names
    command = shutil.which("lint-imports")
    args = [command] if command else [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                                      "lint_imports_command()"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run([*args, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (exit {result.returncode}):\n{output}"
    for name in names:
        assert f"{name} KEPT" in output, f"contract {name!r} not listed as KEPT:\n{output}"


# --------------------------------------------------------------------------------------------------
# compat.py: the Dagster internals dagster_ext uses still exist
# --------------------------------------------------------------------------------------------------


def _versions() -> str:
    return compat.versions_note()


def _quarantine_private_imports() -> set[tuple[str, str]]:
    """(module, name) of every `from dagster._x import name` in mp_pipelines/dagster_ext/."""
    found = set()
    for path in sorted(QUARANTINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and _is_private(node.module):
                found |= {(node.module, alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                assert not any(_is_private(alias.name) for alias in node.names), f"{path}: use `from ... import`"
    return found


def test_compat_lists_every_private_import_of_dagster_ext() -> None:
    listed = {(private.module, private.name) for private in compat.PRIVATE_IMPORTS}
    imported = _quarantine_private_imports()
    assert not imported - listed, f"imported by dagster_ext but not listed in compat.PRIVATE_IMPORTS: {imported - listed}"
    assert not listed - imported, f"listed in compat.PRIVATE_IMPORTS but no longer imported: {listed - imported}"


@pytest.mark.parametrize("private", [*compat.PRIVATE_IMPORTS, *compat.DAGSTER_POSTGRES_HELPERS],
                         ids=lambda private: private.path)
def test_private_name_still_exists(private: compat.Private) -> None:
    problems = compat._check_private(private)
    assert not problems, "\n".join(problems) + f"\n{_versions()}"


@pytest.mark.parametrize("override", compat.OVERRIDES, ids=lambda override: f"{override.by}.{override.method}")
def test_overridden_method_still_exists_on_its_base(override: compat.Override) -> None:
    base = compat._resolve_class(override.base)
    assert override.method in vars(base), (
        f"{override.path} is gone: {base.__qualname__} no longer defines {override.method}, so "
        f"{override.by.replace(':', '.')}.{override.method} may override nothing. {_versions()}"
    )
    if override.parameters is not None:
        method = vars(base)[override.method]
        found = tuple(inspect.signature(getattr(method, "__func__", method)).parameters)  # a classmethod: cls first
        assert found == override.parameters, f"{override.path} now takes {found}. {_versions()}"
    compat.check_override(compat._resolve_class(override.by), override)  # raises with the same story


def test_claim_concurrency_slot_is_overridden_where_dagster_defines_it() -> None:
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    from mp_pipelines.dagster_ext.postgres import PooledPostgresEventLogStorage

    (override,) = [o for o in compat.OVERRIDES if o.method == "_claim_concurrency_slot"]
    assert compat._resolve_class(override.base) is SqlEventLogStorage
    owner = next(klass for klass in PooledPostgresEventLogStorage.__mro__ if "_claim_concurrency_slot" in vars(klass))
    assert owner is PooledPostgresEventLogStorage


def test_a_renamed_base_method_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    from mp_pipelines.dagster_ext.postgres import PooledPostgresEventLogStorage

    monkeypatch.delattr(SqlEventLogStorage, "_claim_concurrency_slot")
    with pytest.raises(compat.DagsterCompatError) as raised:
        compat.checked_overrides(PooledPostgresEventLogStorage)  # what runs when postgres.py is imported
    message = str(raised.value)
    assert "_claim_concurrency_slot" in message and "never be called" in message
    assert f"written against dagster {compat.DAGSTER_VERSION}" in message
    assert f"installed: dagster {compat.installed_version('dagster')}" in message
    assert any("_claim_concurrency_slot" in problem for problem in compat.problems())


def test_a_changed_base_signature_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    from mp_pipelines.dagster_ext.postgres import PooledPostgresEventLogStorage

    def _claim_concurrency_slot(self, concurrency_key, run_id, step_key, priority):  # noqa: ANN001, ANN202
        raise AssertionError("not called")

    monkeypatch.setattr(SqlEventLogStorage, "_claim_concurrency_slot", _claim_concurrency_slot)
    with pytest.raises(compat.DagsterCompatError, match="parameters are now"):
        compat.checked_overrides(PooledPostgresEventLogStorage)


def test_nothing_in_compat_is_out_of_date() -> None:
    problems = compat.problems()
    assert not problems, "\n".join(problems) + f"\n{_versions()}"


def test_the_pins_match_compat() -> None:
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert f'"dagster=={compat.DAGSTER_VERSION}"' in setup
    assert f'"dagster-postgres=={compat.DAGSTER_POSTGRES_VERSION}"' in setup


# --------------------------------------------------------------------------------------------------
# spec/ stands in for Dagster: cron strings and reserved names, compared with Dagster itself
# --------------------------------------------------------------------------------------------------

CRON_STRINGS = [
    "0 6 * * *", "* * * * *", "*/5 * * * *", "0 0 1 1 *", "00 06 * * *", "0\t6\t*\t*\t*", " 0 6 * * * ",
    "0 6  * * *", "0 6 * * *\n", "0,15,30,45 * * * *", "0-59/15 * * * *", "1-5/2 * * * *", "0/5 * * * *",
    "5-10/2 6 * * *", "0 0 * * */2", "0 0 1 */3 *", "0 0 1-31 * *", "15-2 15 * * *",
    # February: the 30th / 31st alone never happens
    "0 0 29 2 *", "0 0 30 2 *", "0 0 31 2 *", "0 0 30 feb *", "0 0 30,31 2 *", "0 0 30-31 2 *", "0 0 30 2,3 *",
    "0 0 31 2,4 *", "0 0 L 2 *", "0 0 L feb *",
    # names, day of week 7, L, #, W
    "0 0 * * MON", "0 0 * * mon-fri", "0 0 * * sun", "0 0 * JAN *", "* * * * SUN-SAT", "0 0 * * 7", "0 0 * * 0-7",
    "0 0 * * 7-7", "0 0 * * 5-1", "0 0 L * *", "0 0 * * L1", "0 0 * * 5#2", "0 0 * * 5L", "0 0 * * L",
    "0 0 15W * *", "0 0 1W,15 * *", "0 0 LW * *", "0 0 * * 1W", "0 0 * * wed", "0 0 * * wed,W",
    # nicknames
    "@daily", "@hourly", "@weekly", "@monthly", "@yearly", "@annually", "@midnight", "@DAILY", "@reboot",
    "@every 5m", " @daily", "@daily ", "@ daily",
    # hashed / random / question mark
    "H * * * *", "H(0-29) * * * *", "R * * * *", "? * * * *", "0 0 ? * *", "0 0 ? ? ?",
    # wrong field counts and out of range
    "0 6 * * * *", "0 6 * * * 0", "0 0 6 * * * *", "0 0 1 1 * 2025", "0 6 * *", "", "   ", "0 6 * * * extra",
    "60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 32 * *", "0 0 * 13 *", "0 0 * 0 *", "0 0 * * 8", "0 0 * * 8-9",
    "*/0 * * * *", "-1 * * * *", "1- * * * *", "a b c d e", "%", "0 0 * * 1#L", "0 0 L-3 * *", "0 0 * * 5#-1",
]

_CRON_PARTS = [
    ["*", "0", "5", "59", "60", "*/15", "0-30/5", "1,2", "30-10", "?", "H", "L", "-1"],
    ["*", "0", "23", "24", "*/2", "9-17", "22-2", "?", "L", "H"],
    ["*", "1", "15", "29", "30", "31", "32", "0", "L", "W", "1W", "15W", "LW", "L-2", "?", "*/2", "1-31", "30,31",
     "29-31", "30-31", "28-L"],
    ["*", "1", "2", "feb", "FEB", "12", "13", "0", "*/3", "2,3", "1-2", "jan-mar", "L", "?", "2/12"],
    ["*", "0", "7", "8", "mon", "MON-FRI", "wed", "sun-sat", "5L", "L5", "L", "5#2", "1#5", "6#6", "?", "*/2",
     "0-7", "7-0", "1,L", "W"],
]


def _generated_cron_strings(count: int = 3000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        fields = [rng.choice(parts) + ("," + rng.choice(parts) if rng.random() < 0.2 else "") for parts in _CRON_PARTS]
        out.append(" ".join(fields))
    return out


def test_cron_strings_are_accepted_exactly_as_dagster_accepts_them() -> None:
    from dagster._utils.schedules import is_valid_cron_string

    def dagster_says(value: str) -> bool:
        try:
            return is_valid_cron_string(value)
        except Exception:  # noqa: BLE001 - the old validator let such an error fail the spec too
            return False

    strings = CRON_STRINGS + _generated_cron_strings()
    differ = [(value, dagster_says(value), is_valid_cron(value))
              for value in strings if dagster_says(value) != is_valid_cron(value)]
    assert not differ, f"(cron, Dagster accepts, spec accepts) that differ: {differ[:20]}. {_versions()}"
    assert sum(map(is_valid_cron, strings)) > 200  # the comparison saw both answers


def test_schedule_spec_rejects_an_invalid_cron_string() -> None:
    assert ScheduleSpec(cron="0 6 * * mon-fri").cron == "0 6 * * mon-fri"
    with pytest.raises(ValueError, match="is not a valid cron string"):
        ScheduleSpec(cron="0 0 30 2 *")
    with pytest.raises(ValueError, match="is not a valid cron string"):
        ScheduleSpec(cron="0 6 * * * *")


def test_reserved_names_are_the_ones_dagster_refuses() -> None:
    from dagster._core.definitions.utils import DISALLOWED_NAMES

    assert set(DISALLOWED_NAMES) == set(keyword.kwlist) | DAGSTER_RESERVED_NAMES, _versions()


@pytest.mark.parametrize("name", ["class", "None", "config", "type", "context", "output"])
def test_a_task_loop_or_workflow_may_not_take_a_name_dagster_refuses(name: str) -> None:
    for what in ("task", "loop", "workflow"):
        with pytest.raises(ValueError, match="Dagster cannot name"):
            check_name(name, what)
    assert check_name(name, "input") == name  # inputs are run config fields, which Dagster does not restrict
