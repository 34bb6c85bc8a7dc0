"""LLMClient against a real loopback HTTP server: answers, retries, timeouts, errors and JSON checks."""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mp_pipelines.llm.client import LLMClient
from mp_pipelines.llm.resource import LLMResource
from mp_pipelines.llm.types import LLMError, LLMRequest
from mp_pipelines_tests.fault_server import RunningServer

FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdef"
SCHEMA = {
    "type": "object",
    "properties": {"done": {"type": "boolean"}, "steps": {"type": "array", "items": {"type": "string"}}},
    "required": ["done", "steps"],
}


MakeClient = Callable[..., LLMClient]


def ask(prompt: str = "Say hello", **kwargs: object) -> LLMRequest:
    """A one-message request labelled like a task item."""
    return LLMRequest(messages=[{"role": "user", "content": prompt}], model="gpt-test", label="greet[0]", **kwargs)


@pytest.fixture
def client_for() -> Iterator[Callable[..., LLMClient]]:
    """Make clients pointed at a loopback server; all are closed after the test."""
    made: list[LLMClient] = []

    def make(server: RunningServer | None, **kwargs: Any) -> LLMClient:
        made.append(LLMClient(**{"base_url": server and server.base_url, "api_key": "local-key", **kwargs}))
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_success_over_http_records_usage(client_for: MakeClient, llm_server: RunningServer) -> None:
    result = client_for(llm_server).complete(ask("Summarise the water cycle", temperature=0.2, max_tokens=200))
    assert result.provider == "openai" and result.model == "gpt-test" and result.attempts == 1
    assert result.text.startswith("[simulated]") and "Summarise the water cycle" in result.text
    assert result.prompt_tokens == 7 and result.completion_tokens > 0 and result.finish_reason == "stop"
    assert result.parsed is None and result.latency_s > 0
    [received] = llm_server.requests
    assert received.body["temperature"] == 0.2 and received.body["max_tokens"] == 200
    assert "authorization" not in received.headers and "response_format" not in received.body


def test_429_with_retry_after_is_honoured_then_succeeds(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    result = client_for(llm_server).complete(ask())
    assert result.attempts == 2 and time.monotonic() - started >= 0.9
    assert [r.headers["x-stainless-retry-count"] for r in llm_server.requests] == ["0", "1"]


def test_500_then_success(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(status=500)
    result = client_for(llm_server).complete(ask())
    assert result.attempts == 2 and result.text.startswith("[simulated]")


def test_retries_exhausted_gives_rate_limit_error(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(status=429, headers={"retry-after-ms": "10"}, times=3)
    with pytest.raises(LLMError) as info:
        client_for(llm_server, max_retries=2).complete(ask())
    err = info.value
    assert err.kind == "rate_limit" and err.retryable and err.attempts == 3 and len(llm_server.requests) == 3
    assert "greet[0]" in str(err) and llm_server.base_url in str(err) and "3 attempts" in str(err)


def test_retry_after_beyond_budget_is_not_waited_for(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(status=429, headers={"Retry-After": "30"})
    started = time.monotonic()
    with pytest.raises(LLMError) as info:
        client_for(llm_server).complete(ask(timeout=2.0))
    assert info.value.kind == "rate_limit" and info.value.attempts == 1 and time.monotonic() - started < 1.5


def test_delay_longer_than_timeout_is_a_clear_timeout(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(delay=3.0)
    started = time.monotonic()
    with pytest.raises(LLMError) as info:
        client_for(llm_server).complete(ask(timeout=0.5))
    elapsed = time.monotonic() - started
    err = info.value
    assert err.kind == "timeout" and err.retryable and "within 0.5 s" in str(err) and "greet[0]" in str(err)
    assert 0.5 <= elapsed < 1.8  # at most one client backoff sleep past the budget


async def _timed_out_async(client: LLMClient) -> tuple[LLMError, float]:
    started = time.monotonic()
    try:
        with pytest.raises(LLMError) as info:
            await client.acomplete(ask(timeout=0.5))
        return info.value, time.monotonic() - started
    finally:
        await client.aclose()


def test_async_timeout_is_cut_at_the_budget(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(delay=3.0)
    err, elapsed = asyncio.run(_timed_out_async(client_for(llm_server)))
    assert err.kind == "timeout" and "within 0.5 s" in str(err) and 0.45 <= elapsed < 0.9


def test_401_names_the_env_var_and_never_the_key(
    client_for: MakeClient, llm_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {FAKE_KEY}.", "type": "invalid_request_error"}}
    llm_server.faults.add(status=401, body=echo)
    client = client_for(llm_server, provider="openai", api_key=FAKE_KEY)
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMError) as info:
        client.complete(ask())
    err = info.value
    assert err.kind == "authentication" and not err.retryable and err.attempts == 1
    assert "OPENAI_API_KEY" in str(err) and llm_server.base_url in str(err)
    assert caplog.records, "debug logging should have captured the openai/httpx logs"
    for text in (str(err), repr(err), repr(client), caplog.text, repr(LLMResource(api_key=FAKE_KEY))):
        assert FAKE_KEY not in text and "FAKEKEY" not in text


def test_server_side_key_check(client_for: MakeClient, llm_server_factory: Callable[..., RunningServer]) -> None:
    server = llm_server_factory(api_key="right-key")
    assert client_for(server, api_key="right-key").complete(ask()).attempts == 1
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        client_for(server, api_key="wrong-key").complete(ask())


def test_bad_request_is_not_retried_and_its_detail_is_redacted(
    client_for: MakeClient, llm_server: RunningServer
) -> None:
    message = f"model 'nope' does not exist for key {FAKE_KEY}"
    llm_server.faults.add(status=400, body={"error": {"message": message}})
    with pytest.raises(LLMError) as info:
        client_for(llm_server, api_key=FAKE_KEY).complete(ask())
    assert info.value.kind == "bad_request" and not info.value.retryable and len(llm_server.requests) == 1
    assert "model 'nope' does not exist" in str(info.value) and FAKE_KEY not in str(info.value)


def test_connection_error_names_the_base_url(client_for: MakeClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound but not listening: refused
        with pytest.raises(LLMError) as info:
            client_for(None, base_url=url, max_retries=0).complete(ask())
    assert info.value.kind == "connection" and url in str(info.value) and info.value.retryable


def test_json_schema_answer_is_parsed_and_validated(client_for: MakeClient, llm_server: RunningServer) -> None:
    result = client_for(llm_server).complete(ask("Plan 4 steps", json_schema=SCHEMA))
    assert isinstance(result.parsed["done"], bool) and len(result.parsed["steps"]) == 4
    fmt = llm_server.requests[0].body["response_format"]
    assert fmt == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA, "strict": False}}


@pytest.mark.parametrize(
    ("mode", "schema", "expected"),
    [
        ("json_schema", None, {"type": "json_object"}),
        ("json_object", SCHEMA, {"type": "json_object"}),
        ("none", SCHEMA, None),
    ],
)
def test_structured_output_modes(
    client_for: MakeClient, llm_server: RunningServer, mode: str, schema: dict | None, expected: dict
) -> None:
    llm_server.faults.add(content='{"done": true, "steps": []}')
    result = client_for(llm_server, structured_output=mode).complete(
        ask("Answer in JSON", json_output=True, json_schema=schema)
    )
    assert result.parsed == {"done": True, "steps": []}
    assert llm_server.requests[0].body.get("response_format") == expected


def test_fenced_json_is_tolerated(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(content='```json\n{"done": true, "steps": ["a"]}\n```')
    assert client_for(llm_server).complete(ask(json_schema=SCHEMA)).parsed == {"done": True, "steps": ["a"]}


def test_invalid_json_answer_is_invalid_output_with_excerpt(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(content="Sure! Here is the plan: {done: yes")
    with pytest.raises(LLMError) as info:
        client_for(llm_server).complete(ask(json_output=True))
    err = info.value
    assert err.kind == "invalid_output" and err.retryable and "not valid JSON" in str(err)
    assert "Sure! Here is the plan: {done: yes" in str(err) and "greet[0]" in str(err)


def test_schema_mismatch_is_invalid_output_with_the_validation_error(
    client_for: MakeClient, llm_server: RunningServer
) -> None:
    llm_server.faults.add(content='{"done": "yes", "steps": []}')
    with pytest.raises(LLMError) as info:
        client_for(llm_server).complete(ask(json_schema=SCHEMA))
    assert info.value.kind == "invalid_output" and "'yes' is not of type 'boolean'" in str(info.value)
    assert '{"done": "yes"' in str(info.value) and "$.done" in str(info.value)


async def _gather(client: LLMClient, n: int) -> list:
    try:
        return await asyncio.gather(*(client.acomplete(ask(f"Topic number {i}")) for i in range(n)))
    finally:
        await client.aclose()


def test_async_calls_overlap(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(delay=0.4, times=6)
    started = time.monotonic()
    results = asyncio.run(_gather(client_for(llm_server), 6))
    assert time.monotonic() - started < 1.2  # the sum of latencies is 2.4 s
    assert all(f"Topic number {i}" in r.text for i, r in enumerate(results))
    arrivals = [r.time for r in llm_server.requests]
    assert max(arrivals) - min(arrivals) < 0.3  # all six were in flight together


def test_calls_share_one_connection_pool_until_many_are_in_flight(client_for: MakeClient,
                                                                   llm_server: RunningServer) -> None:
    """One HTTP pool costs CPU per call in proportion to its connections, so a loop opens another lane (client
    and pool) only when every lane has LANE_CALLS calls in flight; calls one after another reuse one connection."""
    from mp_pipelines.llm.lanes import LANE_CALLS

    client = client_for(llm_server)
    in_flight = 3 * LANE_CALLS

    async def calls() -> int:
        try:
            for i in range(4):
                await client.acomplete(ask(f"one after another {i}"))
            llm_server.faults.add(delay=0.5, times=in_flight)
            answers = await asyncio.gather(*(client.acomplete(ask(f"together {i}")) for i in range(in_flight)))
            assert all(f"together {i}" in a.text for i, a in enumerate(answers))
            lanes = client._async[asyncio.get_running_loop()][0]
            assert lanes.busy == [0] * len(lanes.busy), "every lane got its calls back"
            return len(lanes.clients)
        finally:
            await client.aclose()

    assert asyncio.run(calls()) == 3
    sequential, together = llm_server.requests[:4], llm_server.requests[4:]
    assert len({r.peer for r in sequential}) == 1, "calls one after another reuse the first lane's connection"
    assert llm_server.in_flight.peak >= in_flight, "lanes do not limit how many calls fly"
    assert len({r.peer for r in together}) == in_flight


def test_async_client_survives_successive_event_loops(client_for: MakeClient, llm_server: RunningServer) -> None:
    client = client_for(llm_server)
    first = asyncio.run(client.acomplete(ask("first loop")))  # left open on purpose: its loop is gone
    second = asyncio.run(_gather(client, 2))  # a new loop: the old loop's client must not be reused
    assert "first loop" in first.text and len(second) == 2 and len(llm_server.requests) == 3


def test_llm_resource_against_the_server(llm_server: RunningServer) -> None:
    resource = LLMResource(base_url=llm_server.base_url, api_key="local-key", default_model="house-model")
    assert resource.provider_name == "openai"
    with resource.get_client():
        result = resource.complete(LLMRequest(messages=[{"role": "user", "content": "hi"}], model=""))
    assert result.model == "house-model" and llm_server.requests[0].body["model"] == "house-model"


def test_json_mode_adds_a_json_instruction_only_when_no_message_mentions_json(
    client_for: MakeClient, llm_server: RunningServer
) -> None:
    client = client_for(llm_server, structured_output="json_object")
    client.complete(ask("List three fruits", json_output=True))
    client.complete(ask("List three fruits as json", json_output=True))
    first, second = (r.body["messages"] for r in llm_server.requests)
    assert first[-1] == {"role": "system", "content": "Answer with a JSON object."} and len(second) == 1


def test_llm_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(LLMError("LLM call x failed.", kind="rate_limit", status_code=429, attempts=3)))
    assert (err.kind, err.retryable, err.status_code, err.attempts, str(err)) == (
        "rate_limit",
        True,
        429,
        3,
        "LLM call x failed.",
    )


def test_server_consumes_faults_in_order_and_lists_models(llm_server: RunningServer) -> None:
    llm_server.faults.add(status=503).add(content="scripted answer")
    assert len(llm_server.faults) == 2
    with httpx.Client(base_url=llm_server.base_url) as http:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        statuses = [http.post("/chat/completions", json=payload) for _ in range(3)]
        assert http.get("/models").json()["data"][0]["id"] == "simulated"
    assert [r.status_code for r in statuses] == [503, 200, 200] and len(llm_server.faults) == 0
    assert statuses[1].json()["choices"][0]["message"]["content"] == "scripted answer"
    assert statuses[2].json()["choices"][0]["message"]["content"].startswith("[simulated]")
    assert [r.body["messages"][0]["content"] for r in llm_server.requests] == ["hi"] * 3


# ---------------------------------------------------------------------------------------------------
# TLS: the endpoint's certificate is verified against the process's authorities (or SSL_CERT_FILE).


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_an_https_endpoint_is_verified_against_ssl_cert_file(client_for: MakeClient, tls_files: tuple[str, str],
                                                              llm_server_factory: Callable[..., RunningServer],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server = llm_server_factory(tls=tls_files)
    assert server.base_url.startswith("https://127.0.0.1:")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(LLMError, match="could not verify the server's TLS certificate .*set SSL_CERT_FILE") as refused:
        client_for(server, timeout=5).complete(ask())  # self-signed: not among the system's authorities
    assert refused.value.kind == "tls" and not refused.value.retryable  # a setting to fix, not a failure to retry
    monkeypatch.setenv("SSL_CERT_FILE", tls_files[0])
    assert asyncio.run(client_for(server, timeout=5).acomplete(ask("over TLS"))).text.startswith("[simulated]")
    assert len(server.requests) == 1
