"""Continuous batching: batched answers equal lone ones; departed clients free their slots."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from serving_server import MODEL_NAME, ServerThread, tiny_xlora

PROMPTS = [
    "the quick brown fox",
    "hello",
    "what is the capital of france? paris. what is two plus two?",
    "you are a helpful AI assistant",
    "jumps over the lazy dog",
    "answer the question in one word: hello world",
]
LONG = "the quick brown fox"  # greedy: no end of text within 230 tokens
KINDS = [
    {},
    {"scalings_mode": "frozen"},
    {"scalings_mode": "merged"},  # one group per request, its weights merged while it steps
    {"fixed_expert_weights": {"math": 0.25, "chem": 0.75}},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = tiny_xlora(tmp_path_factory.mktemp("batching"))
    server = ServerThread(model, tokenizer, max_batch=8).start()
    yield server
    server.stop()


def client(server: ServerThread, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **options)


def complete(server: ServerThread, prompt: str, extra: dict, max_tokens: int = 16) -> tuple:
    answer = client(server).completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={**extra, "return_expert_weights": True},
    )
    choice = answer.choices[0]
    return choice.text, choice.model_extra["expert_weights"]


def assert_same(answer: tuple, expected: tuple) -> None:
    """Same text; the same expert weights up to float rounding of the batched matmuls."""
    assert answer[0] == expected[0]
    np.testing.assert_allclose(answer[1], expected[1], atol=1e-4)


def batch_steps(server: ServerThread) -> tuple[float, float]:
    """(decode steps in all, decode steps that ran a single sequence) from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    count = float(re.search(r"^loramix_batch_size_count (\S+)$", text, re.M).group(1))
    alone = float(re.search(r'^loramix_batch_size_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))
    return count, alone


def wait_idle(server: ServerThread, seconds: float = 5.0) -> float:
    """Seconds until the engine runs nothing (fails after `seconds`)."""
    start = time.monotonic()
    while server.engine.running or server.engine.waiting:
        assert time.monotonic() - start < seconds, "the engine kept running the sequences"
        time.sleep(0.01)
    return time.monotonic() - start


def test_batched_answers_equal_lone_answers(server) -> None:
    work = [(p, k) for p in PROMPTS[:3] for k in KINDS]
    alone = {}
    for prompt, kind in work:
        alone[prompt, str(kind)] = complete(server, prompt, kind)
    steps, single = batch_steps(server)
    with ThreadPoolExecutor(len(work)) as pool:
        futures = {(p, str(k)): pool.submit(complete, server, p, k) for p, k in work}
        together = {key: future.result() for key, future in futures.items()}
    steps_after, single_after = batch_steps(server)
    assert steps_after - steps > single_after - single  # some steps ran several sequences
    for key, answer in together.items():
        assert_same(answer, alone[key])


def test_late_request_joins_the_running_batch(server) -> None:
    long_alone = complete(server, PROMPTS[2], {}, max_tokens=80)
    short_alone = complete(server, PROMPTS[1], {}, max_tokens=10)
    with ThreadPoolExecutor(2) as pool:
        long_run = pool.submit(complete, server, PROMPTS[2], {}, 80)
        while not server.engine.running:
            time.sleep(0.001)
        short_run = pool.submit(complete, server, PROMPTS[1], {}, 10)
        short = short_run.result()
        assert not long_run.done()  # the short one left first
        assert_same(long_run.result(), long_alone)
    assert_same(short, short_alone)


def generated_tokens(server: ServerThread) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r"^loramix_generated_tokens_total (\S+)$", text, re.M).group(1))


def test_dropped_stream_frees_its_slot(server) -> None:
    assert len(complete(server, LONG, {}, max_tokens=200)[1]) == 200  # no early end
    before = generated_tokens(server)
    body = {"model": MODEL_NAME, "prompt": LONG, "max_tokens": 200, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    assert wait_idle(server) < 2.0
    assert generated_tokens(server) - before < 150  # the sequence left long before its end
    assert "loramix_running_sequences 0.0" in httpx.get(server.url + "/metrics").text


def test_client_timeout_frees_its_slot_and_others_finish(server) -> None:
    expected = complete(server, PROMPTS[0], {})
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(complete, server, PROMPTS[0], {})
        with pytest.raises(openai.APITimeoutError):
            client(server, timeout=0.3).completions.create(
                model=MODEL_NAME, prompt=LONG, max_tokens=230, temperature=0
            )
        assert_same(other.result(), expected)
    assert wait_idle(server) < 3.0


def test_malformed_request_amid_load(server) -> None:
    expected = {p: complete(server, p, {}) for p in PROMPTS}
    errors = []

    def malformed() -> None:
        for _ in range(3):
            response = httpx.post(
                server.url + "/v1/completions",
                content=b'{"model": "tiny-xlora", "prompt": ',
                headers={"content-type": "application/json"},
            )
            errors.append(response.status_code)
            time.sleep(0.01)

    thread = threading.Thread(target=malformed)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = {p: pool.submit(complete, server, p, {}) for p in PROMPTS}
        thread.start()
        results = {p: f.result() for p, f in futures.items()}
    thread.join()
    assert errors == [400, 400, 400]
    for prompt, answer in results.items():
        assert_same(answer, expected[prompt])
