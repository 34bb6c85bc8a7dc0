"""A fluent WorkflowBuilder: the same WorkflowSpec as a YAML file, written in Python.

The builder only gathers plain data; `build()` validates it with `parse_workflow`, so a mistake
raises the same WorkflowValidationError, with the same field paths, as the equivalent YAML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from mp_pipelines.spec.loader import parse_workflow
from mp_pipelines.spec.models import WorkflowSpec


def _plain(value: Any) -> Any:
    """Models become the dicts YAML would hold, so build() validates one kind of data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class Task:
    """A loop-body task for `WorkflowBuilder.loop`: TaskSpec's fields, checked when the workflow is built."""

    def __init__(self, name: str, prompt: str, **fields: Any) -> None:
        self.data: dict[str, Any] = {"name": name, "prompt": prompt, **_plain(fields)}

    def __repr__(self) -> str:
        return f"Task({self.data!r})"


class WorkflowBuilder:
    """Builds a WorkflowSpec step by step; every method returns the builder, `build()` the spec."""

    def __init__(self, name: str, *, description: str = "", tags: Mapping[str, str] | None = None) -> None:
        self._data: dict[str, Any] = {"name": name, "tasks": []}
        if description:
            self._data["description"] = description
        if tags:
            self._data["tags"] = dict(tags)

    def input(self, name: str, type: str = "string", *,
              description: str = "", default: Any = None) -> WorkflowBuilder:
        """Declare an input (string, integer, number, boolean, list or table); no default means required."""
        spec: dict[str, Any] = {"type": type}
        if description:
            spec["description"] = description
        if default is not None:
            spec["default"] = _plain(default)
        self._data.setdefault("inputs", {})[name] = spec
        return self

    def defaults(self, **settings: Any) -> WorkflowBuilder:
        """Set workflow-wide model settings: model, temperature, max_tokens, system."""
        self._data.setdefault("defaults", {}).update(_plain(settings))
        return self

    def breadth(self, breadth: int) -> WorkflowBuilder:
        """Set `breadth`: the most calls of one fan-out in flight at once."""
        self._data["breadth"] = breadth
        return self

    def depth(self, depth: int) -> WorkflowBuilder:
        """Set `depth`: the most iterations a loop may run."""
        self._data["depth"] = depth
        return self

    def max_items(self, max_items: int) -> WorkflowBuilder:
        """Set `max_items`: a fan-out over more items fails with a clear error."""
        self._data["max_items"] = max_items
        return self

    def limits(self, *, max_in_flight: int | None = None, requests_per_minute: float | None = None,
               tokens_per_minute: float | None = None) -> WorkflowBuilder:
        """Set the YAML `limits:`: rate limits of the run's calls, per model (unset values keep the LLM resource's)."""
        given = (("max_in_flight", max_in_flight), ("requests_per_minute", requests_per_minute),
                 ("tokens_per_minute", tokens_per_minute))
        self._data.setdefault("limits", {}).update({key: value for key, value in given if value is not None})
        return self

    def budget(self, *, max_cost_usd: float | None = None, max_tokens: int | None = None,
               max_calls: int | None = None) -> WorkflowBuilder:
        """Set the YAML `budget:`: no new call once one of these is reached in a run."""
        given = (("max_cost_usd", max_cost_usd), ("max_tokens", max_tokens), ("max_calls", max_calls))
        self._data.setdefault("budget", {}).update({key: value for key, value in given if value is not None})
        return self

    def tag(self, key: str, value: str) -> WorkflowBuilder:
        """Add a tag to the workflow's job."""
        self._data.setdefault("tags", {})[key] = value
        return self

    def task(self, name: str, prompt: str, **fields: Any) -> WorkflowBuilder:
        """Add a top-level task; `fields` are TaskSpec's (depends_on, for_each, when, output, retries, ...)."""
        self._data["tasks"].append(Task(name, prompt, **fields).data)
        return self

    def loop(self, name: str, tasks: Sequence[Task | Mapping[str, Any] | BaseModel], *, until: str | None = None,
             max_iterations: int | None = None, depends_on: Sequence[str] = (),
             description: str = "") -> WorkflowBuilder:
        """Add a bounded loop whose `tasks` run in order each iteration, until `until` holds or the limit."""
        control = {key: value for key, value in (("until", until), ("max_iterations", max_iterations)) if value}
        step: dict[str, Any] = {"name": name}
        if description:
            step["description"] = description
        if depends_on:
            step["depends_on"] = list(depends_on)
        if control:
            step["loop"] = control
        step["tasks"] = [task.data if isinstance(task, Task) else _plain(task) for task in tasks]
        self._data["tasks"].append(step)
        return self

    def schedule(self, cron: str, *, timezone: str | None = None, enabled: bool = False,
                 inputs: Mapping[str, Any] | None = None) -> WorkflowBuilder:
        """Attach a cron schedule; it runs only when `enabled`, with `inputs` as the run's inputs."""
        schedule: dict[str, Any] = {"cron": cron, "enabled": enabled}
        if timezone is not None:
            schedule["timezone"] = timezone
        if inputs:
            schedule["inputs"] = _plain(inputs)
        self._data["schedule"] = schedule
        return self

    def to_dict(self) -> dict[str, Any]:
        """The workflow as the plain data a YAML file would hold (a copy)."""
        return _plain(self._data)

    def build(self) -> WorkflowSpec:
        """Validate and return the spec; WorkflowValidationError lists every problem."""
        return parse_workflow(self.to_dict(), source=f"WorkflowBuilder({self._data['name']!r})")
