"""Quality checks of a task's answers (`checks:` on a task): the model of one check, the parameters each type
takes, and the checks' names. Evaluating them is `tasks/checks.py`; running them as Dagster asset checks is
`factory/checks.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

CheckType = Literal["non_empty", "max_chars", "min_chars", "matches", "json_schema", "unique_ratio", "in_set", "judge"]
CHECK_TYPES: tuple[str, ...] = CheckType.__args__  # type: ignore[attr-defined]
Severity = Literal["warn", "error"]
CHECK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_CHECK_NAME_CHARS = 64
# Parameters each type needs, and those it may take besides `name`, `severity`, `blocking` and `min_ratio`.
REQUIRED: dict[str, tuple[str, ...]] = {
    "non_empty": (), "max_chars": ("value",), "min_chars": ("value",), "matches": ("pattern",), "json_schema": (),
    "unique_ratio": (), "in_set": ("values",), "judge": ("rubric",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"json_schema": ("schema",), "judge": ("min_score",)}
PARAMETERS = ("value", "pattern", "schema", "values", "rubric", "min_score")
DEFAULT_MIN_SCORE = 3.0
_MEANING = {"value": "a number of characters", "pattern": "a regular expression", "values": "a list of labels",
            "rubric": "what the judge scores the answer against", "schema": "a JSON Schema",
            "min_score": "the lowest passing score, 1 to 5"}


class CheckSpec(BaseModel):
    """One quality check of a task's answers; a fan-out's answers are checked one by one (see README)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True)

    type: CheckType
    name: str | None = Field(default=None, description="Shown in the asset's Checks tab; default: the type, "
                             "numbered when a task has several of one type.")
    value: int | None = Field(default=None, ge=0, validate_default=True,
                              description="max_chars / min_chars: the limit in characters.")
    pattern: str | None = Field(default=None, validate_default=True,
                                description="matches: a regular expression found in each answer (re.search).")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", validate_default=True,
                                           description="json_schema: the JSON Schema answers must validate against "
                                           "(default: the task's output_schema).")
    values: list[Any] | None = Field(default=None, min_length=1, validate_default=True,
                                     description="in_set: the allowed answers (labels).")
    rubric: str | None = Field(default=None, min_length=1, validate_default=True,
                               description="judge: what the judging model scores each answer against, 1 to 5.")
    min_score: float | None = Field(default=None, ge=1, le=5, validate_default=True,
                                    description="judge: lowest passing score (default 3).")
    min_ratio: float | None = Field(default=None, ge=0.0, le=1.0,
                                    description="Share of answers that must pass (default 1: all); for unique_ratio "
                                    "the share of distinct answers.")
    severity: Severity = "error"
    blocking: bool = Field(default=False, description="A failed error check stops the tasks downstream.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > MAX_CHECK_NAME_CHARS or not CHECK_NAME.match(value)):
            raise ValueError(f"check name {value[:40]!r} is not an identifier of at most {MAX_CHECK_NAME_CHARS} "
                             "characters (letters, digits, '_'; not starting with a digit)")
        return value

    @field_validator("value", "pattern", "schema_", "values", "rubric", "min_score")
    @classmethod
    def _applies(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type")
        if kind is None:  # the type itself was refused: its parameters cannot be judged
            return value
        field = "schema" if info.field_name == "schema_" else str(info.field_name)
        if value is None:
            if field in REQUIRED[kind]:
                raise ValueError(f"a {kind} check needs {field} ({_MEANING[field]})")
            return value
        if field not in REQUIRED[kind] + OPTIONAL.get(kind, ()):
            takes = [*REQUIRED[kind], *OPTIONAL.get(kind, ()), "min_ratio"]
            raise ValueError(f"{field} does not apply to a {kind} check, which takes {', '.join(takes)}")
        if field == "pattern":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"pattern {value[:60]!r} is not a valid regular expression: {exc}") from None
        if field == "schema":
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"schema is not a valid JSON Schema: {exc.message}") from None
        return value

    @property
    def score_threshold(self) -> float:
        """A judge's lowest passing score."""
        return self.min_score if self.min_score is not None else DEFAULT_MIN_SCORE

    @property
    def ratio_threshold(self) -> float:
        """Share of answers (for unique_ratio: of distinct answers) the check needs."""
        return self.min_ratio if self.min_ratio is not None else 1.0


def check_names(checks: Sequence[CheckSpec]) -> list[str]:
    """Each check's name: its own, else its type, numbered (`matches_2`) when that name is taken."""
    taken = {check.name for check in checks if check.name}
    names = []
    for check in checks:
        if check.name:
            names.append(check.name)
            continue
        name, number = check.type, 1
        while name in taken:
            number += 1
            name = f"{check.type}_{number}"
        taken.add(name)
        names.append(name)
    return names


def check_problems(checks: Sequence[CheckSpec], path: str, output_schema: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(field path, reason) for what is wrong across a task's checks: a name used twice, a json_schema check with
    no schema to use. `path` is the task's, e.g. `tasks[2] (draft)`."""
    problems = []
    seen: dict[str, int] = {}
    for index, (check, name) in enumerate(zip(checks, check_names(checks))):
        where = f"{path}.checks[{index}]" + (f" ({check.name})" if check.name else "")
        if name in seen:
            problems.append((f"{where}.name", f"check name {name!r} is already used by checks[{seen[name]}]; every "
                                              "check of a task needs its own name"))
        seen.setdefault(name, index)
        if check.type == "json_schema" and check.schema_ is None and output_schema is None:
            problems.append((f"{where}.schema", "a json_schema check needs schema (a JSON Schema), or an "
                                                "output_schema on its task to use"))
    return problems
