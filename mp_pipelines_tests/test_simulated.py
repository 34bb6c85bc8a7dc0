"""The simulated model: deterministic answers, schema-valid JSON, injected failures, timeouts, resource use."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import dagster as dg
import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from mp_pipelines.llm.client import LLMClient
from mp_pipelines.llm.resource import LLMResource
from mp_pipelines.llm.simulated import SimulatedModel, SimulatedTransport
from mp_pipelines.llm.types import LLMError, LLMRequest


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    """A chat.completions request body with one user message."""
    return {"model": "sim-test", "messages": [{"role": "user", "content": prompt}], **extra}


def with_schema(prompt: str, schema: dict[str, Any]) -> dict[str, Any]:
    return body(prompt, response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": schema}})


class Finding(BaseModel):
    claim: str
    confidence: float
    sources: list[str]


class Report(BaseModel):
    title: str
    findings: list[Finding]
    reviewer: Finding | None = None


SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    },
    "bounds": {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 7, "maximum": 9},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "label": {"enum": ["low", "mid", "high"]},
            "kind": {"const": "answer"},
            "code": {"type": "string", "minLength": 60, "maxLength": 70},
        },
        "required": ["score", "ratio", "label", "kind"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "few": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            "many": {"type": "array", "items": {"type": "string"}, "minItems": 8},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "uniqueItems": True, "maxItems": 3},
        },
        "required": ["few", "many", "tags"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "plan": {
                "type": "object",
                "properties": {
                    "steps": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {"id": {"type": "integer", "minimum": 1}, "done": {"type": "boolean"}},
                            "required": ["id", "done"],
                        },
                    }
                },
                "required": ["steps"],
            }
        },
        "required": ["plan"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            "when": {"type": "string", "format": "date-time"},
        },
    },
    "pydantic_refs": Report.model_json_schema(),
    "top_level_array": {"type": "array", "items": {"type": "string"}},
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "boolean"}],
        "items": {"type": "string"},
        "minItems": 3,
    },
}


def test_text_answers_are_deterministic_labelled_and_reflect_the_prompt() -> None:
    model = SimulatedModel()
    status, headers, first = model.respond(body("Explain photosynthesis briefly"))
    _, _, again = SimulatedModel(seed=99).respond(body("Explain photosynthesis briefly"))
    _, _, other = model.respond(body("Explain tides briefly"))
    text = first["choices"][0]["message"]["content"]
    assert status == 200 and headers["x-simulated"] == "true"
    assert text == again["choices"][0]["message"]["content"] != other["choices"][0]["message"]["content"]
    assert text.startswith("[simulated]") and "Explain photosynthesis briefly" in text
    assert first["model"] == "sim-test" and first["choices"][0]["finish_reason"] == "stop"
    usage = first["usage"]
    assert usage["prompt_tokens"] == math.ceil(len("Explain photosynthesis briefly") / 4)
    assert usage["completion_tokens"] == math.ceil(len(text) / 4)


def test_temperature_is_part_of_the_request_identity() -> None:
    model = SimulatedModel()
    answers = {model.respond(body("same", temperature=t))[2]["choices"][0]["message"]["content"] for t in (0, 1)}
    assert len(answers) == 2


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_satisfy_the_schema(name: str) -> None:
    schema = SCHEMAS[name]
    _, _, response = SimulatedModel().respond(with_schema("Write the report", schema))
    value = json.loads(response["choices"][0]["message"]["content"])
    jsonschema.validate(value, schema)
    _, _, again = SimulatedModel().respond(with_schema("Write the report", schema))
    assert json.loads(again["choices"][0]["message"]["content"]) == value


def test_pydantic_schema_answer_round_trips_through_the_model() -> None:
    _, _, response = SimulatedModel().respond(with_schema("Report on 2 findings", Report.model_json_schema()))
    report = Report.model_validate_json(response["choices"][0]["message"]["content"])
    assert len(report.findings) == 2 and report.title.startswith("[simulated]")


@pytest.mark.parametrize(("prompt", "expected"), [("List 7 risks of 2025", 7), ("List risks", 3), ("Top 40 risks", 3)])
def test_array_length_follows_the_first_small_number_in_the_prompt(prompt: str, expected: int) -> None:
    schema = {"type": "object", "properties": {"risks": {"type": "array", "items": {"type": "string"}}}}
    _, _, response = SimulatedModel().respond(with_schema(prompt, schema))
    assert len(json.loads(response["choices"][0]["message"]["content"])["risks"]) == expected


def test_json_object_mode_without_schema_gives_a_small_object() -> None:
    _, _, response = SimulatedModel().respond(body("Answer in JSON", response_format={"type": "json_object"}))
    value = json.loads(response["choices"][0]["message"]["content"])
    assert value["simulated"] is True and "Answer in JSON" in value["answer"]


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    _, _, response = SimulatedModel().respond(body("A long question about many things", max_tokens=3))
    choice = response["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["message"]["content"]) == 12


def test_invalid_bodies_are_http_400() -> None:
    assert SimulatedModel().respond({"model": "m", "messages": []})[0] == 400
    assert SimulatedModel().respond({"messages": [{"role": "user", "content": "x"}]})[0] == 400


def test_failure_rate_injects_500s_and_429s_reproducibly() -> None:
    model = SimulatedModel(failure_rate=0.5, seed=3)
    statuses = [model.respond(body(f"q{i}")) for i in range(200)]
    codes = [s for s, _, _ in statuses]
    assert {200, 429, 500} == set(codes) and 60 < codes.count(200) < 140
    assert all(h.get("retry-after") == "0" for s, h, _ in statuses if s == 429)
    replay = SimulatedModel(failure_rate=0.5, seed=3)
    assert [replay.respond(body(f"q{i}"))[0] for i in range(200)] == codes


async def _many(client: LLMClient, n: int) -> list[Any]:
    return await asyncio.gather(
        *(client.acomplete(LLMRequest([{"role": "user", "content": f"item {i}"}], "m")) for i in range(n))
    )


def test_failure_rate_is_absorbed_by_the_clients_retries() -> None:
    client = LLMClient(simulated_failure_rate=0.3, simulated_seed=1, max_retries=8)
    results = asyncio.run(_many(client, 30))
    assert all(r.text.startswith("[simulated]") for r in results)
    assert any(r.attempts > 1 for r in results) and sum(r.attempts for r in results) > 30


def test_transport_sleeps_its_latency_and_serves_models() -> None:
    with httpx.Client(transport=SimulatedTransport(SimulatedModel(latency=0.2)), base_url="http://sim/v1") as http:
        started = time.monotonic()
        response = http.post("/chat/completions", json=body("hello"))
        assert response.status_code == 200 and time.monotonic() - started >= 0.2
        assert http.get("/models").json()["data"][0]["id"] == "simulated"
        assert http.get("/nowhere").status_code == 404


def test_transport_honours_the_read_timeout_sync_and_async() -> None:
    transport = SimulatedTransport(SimulatedModel(latency=5.0))
    with httpx.Client(transport=transport, timeout=0.2) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            http.post("http://sim/v1/chat/completions", json=body("slow"))
        assert time.monotonic() - started < 1.0

    async def slow() -> None:
        async with httpx.AsyncClient(transport=transport, timeout=0.2) as http:
            await http.post("http://sim/v1/chat/completions", json=body("slow"))

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(slow())
    assert time.monotonic() - started < 1.0


def test_client_timeout_on_the_simulated_provider_is_an_llm_error() -> None:
    with LLMClient(simulated_latency=5.0) as client:
        with pytest.raises(LLMError) as info:
            client.complete(LLMRequest([{"role": "user", "content": "x"}], "m", timeout=0.3, label="slow[1]"))
    assert info.value.kind == "timeout" and "slow[1]" in str(info.value) and "0.3 s" in str(info.value)


def test_simulated_client_is_labelled_and_validates_json() -> None:
    with LLMClient() as client:
        assert client.provider_name == "simulated"
        schema = SCHEMAS["nested"]
        result = client.complete(LLMRequest([{"role": "user", "content": "Plan 2 steps"}], "m", json_schema=schema))
    assert result.provider == "simulated" and result.attempts == 1 and len(result.parsed["plan"]["steps"]) == 2
    assert (
        LLMClient(api_key="k").provider_name == "openai" and LLMClient(base_url="http://x/v1").provider_name == "openai"
    )


def test_resource_works_directly_outside_a_run() -> None:
    resource = LLMResource(default_model="sim-default")
    assert resource.provider_name == "simulated"
    result = resource.complete(LLMRequest([{"role": "user", "content": "direct"}], model=""))
    assert result.model == "sim-default" and "direct" in result.text and result.provider == "simulated"
    resource.get_client().close()


def test_resource_builds_and_closes_its_client_with_the_run() -> None:
    with dg.build_resources({"llm": LLMResource(simulated_latency=0.01)}) as resources:
        llm = resources.llm
        assert llm._client is not None  # built by setup_for_execution
        assert asyncio.run(llm.acomplete(LLMRequest([{"role": "user", "content": "async"}], "m"))).attempts == 1
    assert llm._client is None  # closed by teardown_after_execution


def test_resource_in_an_op() -> None:
    @dg.op
    def summarise(llm: LLMResource) -> dict:
        result = llm.complete(
            LLMRequest([{"role": "user", "content": "Summarise 2 items"}], "", json_schema=SCHEMAS["arrays"])
        )
        return {"parsed": result.parsed, "provider": result.provider, "model": result.model}

    @dg.job
    def summarise_job() -> None:
        summarise()

    outcome = summarise_job.execute_in_process(resources={"llm": LLMResource(default_model="op-model")})
    output = outcome.output_for_node("summarise")
    assert outcome.success and output["provider"] == "simulated" and output["model"] == "op-model"
    jsonschema.validate(output["parsed"], SCHEMAS["arrays"])
