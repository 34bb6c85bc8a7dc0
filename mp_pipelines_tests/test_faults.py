"""Faults over real HTTP: each fault kind of the loopback server against the real LLMClient, then a faulty fan-out."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import openai
import pytest

from mp_pipelines.llm.client import LLMClient, LLMError, LLMRequest
from mp_pipelines_tests.fault_server import RANDOM_FAULT_KINDS, FaultScript, RunningServer, make_fault
from mp_pipelines_tests.workflow_helpers import run_file, write_workflow

FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdef"
# fault kind → (LLMError kind once the client's retries are spent, words the message must hold)
CLIENT_RETRIED = {
    "rate_limit": ("rate_limit", "HTTP 429"),
    "rate_limit_no_retry_after": ("rate_limit", "HTTP 429"),
    "server_error": ("server_error", "HTTP 500"),
    "unavailable": ("server_error", "HTTP 503"),
    "connection_reset": ("connection", "Connection reset by peer"),
    "cut_off": ("connection", "peer closed connection without sending complete message body"),
}
# A 200 the client cannot use: not retried by the openai client (it is no HTTP error), retried per item.
NOT_RETRIED_BY_CLIENT = {
    "malformed_json": ("server_error", "a body that is not JSON"),
    "empty_choices": ("server_error", "an empty `choices` list"),
}
MakeClient = Callable[..., LLMClient]


def ask(prompt: str = "Say hello", **kwargs: Any) -> LLMRequest:
    """A one-message request labelled like a task item."""
    return LLMRequest(messages=[{"role": "user", "content": prompt}], model="gpt-test", label="greet[0]", **kwargs)


@pytest.fixture
def client_for() -> Iterator[MakeClient]:
    """Make clients (with a fake key) pointed at a loopback server; all are closed after the test."""
    made: list[LLMClient] = []

    def make(server: RunningServer, **kwargs: Any) -> LLMClient:
        made.append(LLMClient(base_url=server.base_url, api_key=FAKE_KEY, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


async def _failed_call(client: LLMClient, request: LLMRequest) -> LLMError:
    """The LLMError an async call raises (the call must fail)."""
    try:
        with pytest.raises(LLMError) as info:
            await client.acomplete(request)
        return info.value
    finally:
        await client.aclose()


@pytest.mark.parametrize("kind", list(CLIENT_RETRIED))
def test_transient_fault_is_retried_by_the_client(kind: str, client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add(kind)
    result = client_for(llm_server).complete(ask())
    assert result.attempts == 2 and result.text.startswith("[simulated]") and "Say hello" in result.text
    assert [r.fault for r in llm_server.requests] == [kind, None]


@pytest.mark.parametrize("kind", [*CLIENT_RETRIED, *NOT_RETRIED_BY_CLIENT])
def test_persistent_fault_ends_as_a_clear_retryable_error(kind: str, client_for: MakeClient, llm_server: RunningServer) -> None:
    error_kind, words = {**CLIENT_RETRIED, **NOT_RETRIED_BY_CLIENT}[kind]
    llm_server.faults.add(kind, times=2)
    err = asyncio.run(_failed_call(client_for(llm_server, max_retries=1), ask()))
    attempts = 2 if kind in CLIENT_RETRIED else 1
    assert (err.kind, err.retryable, err.attempts, len(llm_server.requests)) == (error_kind, True, attempts, attempts)
    assert words in str(err) and f"after {attempts} attempt" in str(err)
    assert "greet[0]" in str(err) and llm_server.base_url in str(err) and FAKE_KEY not in str(err)


def test_read_timeout_is_a_timeout_and_the_server_lets_go(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add("read_timeout")
    client = client_for(llm_server)
    started = time.monotonic()
    with pytest.raises(LLMError) as info:
        client.complete(ask(timeout=0.5))
    assert 0.5 <= time.monotonic() - started < 1.5
    # The budget covers the client's retries, so the held attempt spends it all: a retry is an item retry.
    assert info.value.kind == "timeout" and info.value.attempts == 1 and "within 0.5 s" in str(info.value)
    deadline = time.monotonic() + 2.0
    while llm_server.in_flight.current and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm_server.in_flight.current == 0  # the server stopped holding once the client hung up
    assert client.complete(ask()).attempts == 1


def test_malformed_body_echoing_the_key_is_redacted(client_for: MakeClient, llm_server: RunningServer) -> None:
    llm_server.faults.add("malformed_json", content=f"<html>Invalid key {FAKE_KEY}</html>")
    with pytest.raises(LLMError) as info:
        client_for(llm_server).complete(ask())
    assert info.value.kind == "server_error" and "<html>Invalid key ***</html>" in str(info.value)
    assert FAKE_KEY not in str(info.value) and FAKE_KEY not in repr(info.value)


def test_a_200_that_is_not_json_at_all_is_a_clear_error(client_for: MakeClient, llm_server: RunningServer) -> None:
    """A proxy's HTML page: the openai SDK returns the body as a string instead of raising."""
    llm_server.faults.add("malformed_json", content="<html>502 from the proxy</html>",
                          headers={"content-type": "text/html"})
    with pytest.raises(LLMError) as info:
        client_for(llm_server).complete(ask())
    assert info.value.kind == "server_error" and info.value.retryable
    assert "not a chat completion" in str(info.value) and "502 from the proxy" in str(info.value)


def test_streamed_answer_is_cut_off_mid_way(llm_server: RunningServer) -> None:
    llm_server.faults.add("cut_off")
    prompt = [{"role": "user", "content": "Tell me about the sea, the sky and the long road home"}]
    words: list[str] = []
    with openai.OpenAI(base_url=llm_server.base_url, api_key="local-key", max_retries=0) as raw:
        with pytest.raises(openai.APIConnectionError):
            for chunk in raw.chat.completions.create(model="gpt-test", messages=prompt, stream=True):
                words.append(chunk.choices[0].delta.content or "")
        full = raw.chat.completions.create(model="gpt-test", messages=prompt).choices[0].message.content
    assert 1 <= len(words) < len(full.split(" ")) and full.startswith("".join(words))


def test_random_faults_are_deterministic_per_seed() -> None:
    def draws(seed: int) -> list[str | None]:
        script = FaultScript(failure_rate=0.2, seed=seed)
        return [fault.kind if fault else None for fault in (script.pop() for _ in range(4000))]

    first = draws(7)
    assert first == draws(7) and first != draws(8)
    assert 0.18 < sum(kind is not None for kind in first) / len(first) < 0.22
    assert set(first) - {None} == set(RANDOM_FAULT_KINDS) and "read_timeout" not in RANDOM_FAULT_KINDS
    with pytest.raises(ValueError, match="'reste' is unknown; use 'scripted' or one of rate_limit"):
        make_fault("reste")


def fan_out(name: str, items: int, *, breadth: int, shard: int | None = None, retries: int = 4) -> str:
    """A workflow echoing `items` words w000, w001, ... with item retries."""
    shard_line = f"\n    shard_size: {shard}" if shard else ""
    return f"""
name: {name}
breadth: {breadth}
inputs:
  words: {{type: list, default: {[f"w{i:03d}" for i in range(items)]}}}
tasks:
  - name: echo
    for_each: inputs.words
    prompt: "Echo {{{{ item }}}}"
    retries: {{max_retries: {retries}, delay: 0}}{shard_line}
"""


def test_item_retries_recover_from_answers_the_client_cannot_use(openai_env: RunningServer, instance: dg.DagsterInstance,
                                                                 tmp_path: Path) -> None:
    openai_env.faults.add("malformed_json").add("empty_choices")
    outcome = run_file(write_workflow(tmp_path, fan_out("unusable", 2, breadth=1, shard=2, retries=1)), {}, instance)
    assert outcome.success, outcome.as_text()
    assert [r.fault for r in openai_env.requests] == ["malformed_json", "empty_choices", None, None]
    assert all(f"Echo w{i:03d}" in text for i, text in enumerate(outcome.tasks["echo"]["output"]))
    assert outcome.usage.calls == 2  # the two unusable 200s are not counted as calls


def test_fan_out_of_500_survives_20_percent_random_faults(llm_server_factory: Callable[..., RunningServer],
                                                         monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance,
                                                         tmp_path: Path) -> None:
    # OpenAI-style retry-after-ms on the 429s: every 429 pauses the process's calls (1 s with a bare 429).
    quick_429 = make_fault("rate_limit", headers={"retry-after-ms": "100"})
    kinds = [quick_429 if kind == "rate_limit" else kind for kind in RANDOM_FAULT_KINDS]
    server = llm_server_factory(faults=FaultScript(failure_rate=0.2, seed=11, kinds=kinds))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    outcome = run_file(write_workflow(tmp_path, fan_out("faulty", 500, breadth=50)), {}, instance, executor=None)
    assert outcome.success, outcome.as_text()
    output = outcome.tasks["echo"]["output"]
    assert len(output) == 500 and len(set(output)) == 500  # nothing lost, nothing doubled
    assert all(f"Echo w{i:03d}" in text for i, text in enumerate(output))  # in input order
    faults = Counter(r.fault for r in server.requests)
    answered = faults.pop(None)
    assert set(faults) == set(RANDOM_FAULT_KINDS) and 0.15 < sum(faults.values()) / len(server.requests) < 0.25
    assert outcome.usage.calls == answered == 500  # each used answer counted once, and no other
