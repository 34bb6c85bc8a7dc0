"""Named providers: a workflow's `providers:` over those of the shared file named by MP_PROVIDERS_FILE, and
the checks of every `model:` and `fallback:` that names one.

`model: X/Y` names provider X only when X is declared; otherwise `X/Y` is a model id (vLLM's
`meta-llama/Llama-3.1-8B-Instruct`). The shared file holds `providers: {NAME: {base_url, api_key_env,
headers, limits}}` (or that mapping alone).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mp_pipelines.spec.models import PROVIDER_NAME, ProviderSpec, WorkflowSpec
from mp_pipelines.spec.problems import Problem, WorkflowValidationError, pydantic_problems

PROVIDERS_ENV = "MP_PROVIDERS_FILE"
_FILE_CACHE: dict[tuple[str, float, int], dict[str, ProviderSpec]] = {}


def shared_providers() -> dict[str, ProviderSpec]:
    """The providers of the file named by MP_PROVIDERS_FILE ({} when unset); WorkflowValidationError naming the
    file, the field and why when it cannot be used."""
    name = os.environ.get(PROVIDERS_ENV, "").strip()
    if not name:
        return {}
    path = Path(name)
    try:
        stat = path.stat()
        cache_key = (str(path.resolve()), stat.st_mtime, stat.st_size)
        if cache_key in _FILE_CACHE:
            return _FILE_CACHE[cache_key]
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
        raise WorkflowValidationError([Problem(name, "", f"the providers file ({PROVIDERS_ENV}) {reason}")],
                                      name) from None
    except yaml.YAMLError as exc:
        raise WorkflowValidationError([Problem(name, "", f"invalid YAML: {exc}")], name) from None
    if isinstance(data, dict) and set(data) == {"providers"}:
        data = data["providers"]
    if not isinstance(data, dict):
        raise WorkflowValidationError([Problem(name, "", "a providers file holds `providers:`, a mapping of "
                                                         "provider names to {base_url, api_key_env, headers, limits}")],
                                      name)
    providers, problems = {}, []
    for key, value in data.items():
        path_text = f"providers.{key}"
        if not isinstance(key, str) or not PROVIDER_NAME.match(key):
            problems.append(Problem(name, path_text, _name_problem(key)))
            continue
        try:
            providers[key] = ProviderSpec.model_validate(value)
        except ValidationError as exc:
            for problem in pydantic_problems(exc, value, name):
                problems.append(Problem(name, f"{path_text}.{problem.path}".rstrip("."), problem.message))
    if problems:
        raise WorkflowValidationError(problems, name)
    _FILE_CACHE[cache_key] = providers
    return providers


def declared_providers(spec: WorkflowSpec) -> dict[str, ProviderSpec]:
    """The providers a workflow's tasks may name: the shared file's, with the workflow's own over them."""
    return {**shared_providers(), **spec.providers}


def _name_problem(name: Any) -> str:
    return (f"provider name {str(name)[:40]!r} is not usable: letters, digits, '_', '.', '-', starting with a "
            "letter, at most 64 characters (no '/': `model: provider/model` splits at the first one)")


def check_models(spec: WorkflowSpec, source: str | None = None) -> list[Problem]:
    """Problems of the workflow's providers, models and fallbacks (a bad MP_PROVIDERS_FILE included)."""
    problems: list[Problem] = []
    for name in spec.providers:
        if not PROVIDER_NAME.match(name):
            problems.append(Problem(source, f"providers.{name}", _name_problem(name)))
    try:
        declared = declared_providers(spec)
    except WorkflowValidationError as exc:
        return problems + list(exc.problems)

    def check(path: str, ref: str | None) -> None:
        if ref is None:
            return
        head, slash, rest = ref.partition("/")
        if not ref.strip() or (slash and (not head or not rest) and head in declared):
            problems.append(Problem(source, path, f"{ref!r} names no model: write `model` or `provider/model`"))
            return
        if slash and head not in declared:
            close = difflib.get_close_matches(head, list(declared), n=1, cutoff=0.75)
            if close:
                problems.append(Problem(source, path, f"unknown provider {head!r} (declared: "
                                                      f"{', '.join(sorted(declared))}); did you mean "
                                                      f"{close[0]!r}? A model id with '/' is sent as it is only "
                                                      "when its first part is no provider's near-namesake"))

    check("defaults.model", spec.defaults.model)
    for i, ref in enumerate(spec.fallback or []):
        check(f"fallback[{i}]", ref)
    for i, task in enumerate(spec.all_tasks()):
        path = f"task {task.name}"
        check(f"{path}.model", task.model)
        own = spec.settings_for(task).model
        for j, ref in enumerate(spec.fallback_for(task)):
            check(f"{path}.fallback[{j}]", ref)
            if own is not None and ref == own:
                problems.append(Problem(source, f"{path}.fallback[{j}]", f"{ref!r} is the task's own model; a "
                                                                          "fallback must be another model"))
    return problems
