"""The server's OpenAI API, driven by the real `openai` client and raw HTTP (httpx)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch
from serving_server import EXPERTS, MODEL_NAME, ServerThread, tiny_xlora
from tiny_tokenizer import tiny_tokenizer

CHAT = [{"role": "user", "content": "what is two plus two?"}]
NAN = float("nan")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(server, references): library answers computed before the server thread starts."""
    model, tokenizer = tiny_xlora(tmp_path_factory.mktemp("api"))
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    refs = {}
    for mode in ("granular", "frozen", "merged"):
        out = model.generate(ids, max_new_tokens=12, do_sample=False, scalings_mode=mode)
        refs[mode] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    with model.fixed_scalings(torch.tensor([0.0, 0.0, 1.0])):
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    refs["bio"] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    server = ServerThread(model, tokenizer).start()
    yield server, refs
    server.stop()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, **options):
    options.setdefault("max_tokens", 12)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **options)


def test_models_lists_the_model_and_its_experts(client) -> None:
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME
    assert card.model_extra["experts"] == list(EXPERTS)
    assert len(card.model_extra["adapted_modules"]) == 14  # 7 modules x 2 blocks
    assert card.model_extra["prompt_rendering"] is None  # not recorded


@pytest.mark.parametrize("mode", ["granular", "frozen", "merged"])
def test_greedy_chat_equals_the_library_and_repeats(served, client, mode) -> None:
    first = chat(client, extra_body={"scalings_mode": mode})
    second = chat(client, extra_body={"scalings_mode": mode})
    assert first.choices[0].message.content == served[1][mode]
    assert second.choices[0].message.content == first.choices[0].message.content
    assert first.model_extra["scalings_mode"] == mode
    usage = first.usage
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert first.choices[0].finish_reason == "length"


def test_expert_weights_one_list_per_token(client) -> None:
    answer = chat(client, extra_body={"return_expert_weights": True})
    choice = answer.choices[0]
    weights, pieces = choice.model_extra["expert_weights"], choice.model_extra["expert_tokens"]
    assert answer.model_extra["experts"] == list(EXPERTS)
    assert len(weights) == len(pieces) == answer.usage.completion_tokens
    assert all(len(w) == 3 and abs(sum(w) - 1) < 1e-4 for w in weights)
    assert "".join(pieces) == choice.message.content
    assert len({tuple(w) for w in weights}) > 1  # granular: the mix changes per token


def test_frozen_weights_stay_fixed_after_the_first_token(client) -> None:
    answer = chat(client, extra_body={"return_expert_weights": True, "scalings_mode": "frozen"})
    weights = answer.choices[0].model_extra["expert_weights"]
    assert all(w == weights[1] for w in weights[1:])


def test_fixed_mix_equals_the_library_and_reports_it(served, client) -> None:
    answer = chat(
        client, extra_body={"fixed_expert_weights": {"bio": 1.0}, "return_expert_weights": True}
    )
    assert answer.choices[0].message.content == served[1]["bio"]
    assert answer.model_extra["scalings_mode"] == "fixed"
    assert all(w == [0.0, 0.0, 1.0] for w in answer.choices[0].model_extra["expert_weights"])


def test_layer_scalings_are_the_mean_of_the_answer(client) -> None:
    answer = chat(client, extra_body={"return_layer_scalings": True})
    layers = answer.choices[0].model_extra["layer_scalings"]
    assert len(answer.model_extra["adapted_modules"]) == len(layers) == 14
    assert all(len(row) == 3 and abs(sum(row) - 1) < 1e-4 for row in layers)


def test_stream_equals_the_plain_answer(client) -> None:
    plain = chat(client, extra_body={"return_expert_weights": True})
    text, weights, pieces, reasons = "", [], [], []
    for chunk in chat(client, stream=True, extra_body={"return_expert_weights": True}):
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        weights += choice.model_extra["expert_weights"]
        pieces += choice.model_extra["expert_tokens"]
        assert len(choice.model_extra["expert_weights"]) == len(choice.model_extra["expert_tokens"])
        reasons.append(choice.finish_reason)
    assert text == plain.choices[0].message.content
    assert weights == plain.choices[0].model_extra["expert_weights"]
    assert "".join(pieces) == text
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_raw_stream_ends_with_done_and_usage(served) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "the quick brown",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", served[0].url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == 6
    assert all(line.startswith("data: ") for line in lines)


def test_completions_n_and_seed(client) -> None:
    options = dict(model=MODEL_NAME, prompt="hello world", max_tokens=8, n=3, seed=7)
    first = client.completions.create(temperature=1.0, **options)
    again = client.completions.create(temperature=1, **options)  # a JSON integer is a number
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # each choice has its own sampler
    assert first.usage.completion_tokens == 24


def test_token_id_and_list_prompts(client) -> None:
    by_text = client.completions.create(
        model=MODEL_NAME, prompt="hello", max_tokens=5, temperature=0
    )
    both = client.completions.create(
        model=MODEL_NAME, prompt=["hello", "the quick"], max_tokens=5, temperature=0
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text


def test_token_id_batch_equals_its_prompts_one_by_one(client) -> None:
    texts = ["hello", "the quick"]
    ids = [tiny_tokenizer()(text).input_ids for text in texts]  # [[282, 312], [86, ...]]
    options = dict(model=MODEL_NAME, max_tokens=6, temperature=0)
    alone = [client.completions.create(prompt=row, **options) for row in ids]
    batch = client.completions.create(prompt=ids, **options)
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    as_text = client.completions.create(prompt=texts, **options)
    assert [c.text for c in as_text.choices] == [c.text for c in batch.choices]
    streamed = ["", ""]
    for chunk in client.completions.create(prompt=ids, stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in batch.choices]


def test_token_id_batch_numbers_choices_prompt_by_prompt(client) -> None:
    ids = [[282, 312], [86, 259, 281, 309]]
    options = dict(model=MODEL_NAME, max_tokens=6, temperature=1.0, n=2, seed=3)
    alone = [client.completions.create(prompt=row, **options) for row in ids]
    batch = client.completions.create(prompt=ids, **options)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # choice i of prompt p: p * n + i
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]


def test_stop_string_cuts_the_answer(served, client) -> None:
    full = served[1]["granular"]
    stop = full[5:8]
    answer = chat(client, stop=[stop, "never-seen"])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].delta.content or "" for c in chat(client, stop=stop, stream=True)
    )
    assert streamed == answer.choices[0].message.content


def at_completions(body: dict) -> tuple[str, dict]:
    """A row of `test_bad_requests_get_openai_errors` for /v1/completions, not the chat route."""
    return "/v1/completions", body


def post(served, body, route: str = "/v1/chat/completions") -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(served[0].url + route, json=body)
    return httpx.post(
        served[0].url + route, content=body, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    "body, status, param, fix",
    [
        ('{"model": "tiny-xlora", "messages": [', 400, None, "JSON"),
        ({"model": MODEL_NAME}, 400, "messages", "missing"),
        ({"messages": CHAT}, 400, "model", "missing"),
        ({"model": MODEL_NAME, "messages": CHAT, "temperature": 3}, 400, "temperature", "2"),
        ({"model": MODEL_NAME, "messages": CHAT, "n": 0}, 400, "n", "1"),
        ({"model": MODEL_NAME, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "1"),
        ({"model": MODEL_NAME, "messages": CHAT, "logprobs": True}, 400, "logprobs", "leave"),
        ({"model": "gpt-4", "messages": CHAT}, 404, "model", MODEL_NAME),
        ({"model": MODEL_NAME, "messages": CHAT, "max_tokens": 10_000}, 400, "max_tokens", "256"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "fixed_expert_weights": {"geo": 1}},
            400,
            "fixed_expert_weights",
            "math",
        ),
        (  # NaN is what Python's json writes for float("nan"); the server must refuse it
            json.dumps(
                {"model": MODEL_NAME, "messages": CHAT, "fixed_expert_weights": {"bio": NAN}}
            ),
            400,
            "fixed_expert_weights",
            "finite",
        ),
        (
            {
                "model": MODEL_NAME,
                "messages": CHAT,
                "fixed_expert_weights": {"bio": 1e308, "chem": 1e308},
            },
            400,
            "fixed_expert_weights",
            "finite",
        ),
        ({"model": MODEL_NAME, "messages": CHAT, "seed": 2**70}, 400, "seed", "less than"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "scalings_mode": "fast"},
            400,
            "scalings_mode",
            "'granular', 'frozen' or 'merged'",
        ),
        (  # a typo is refused as OpenAI refuses it, not served with the default length
            {"model": MODEL_NAME, "messages": CHAT, "max_token": 5},
            400,
            "max_token",
            "Unrecognized request argument supplied: max_token (did you mean max_tokens?)",
        ),
        (  # top_k is no typo of top_p: no hint
            {"model": MODEL_NAME, "messages": CHAT, "max_token": 5, "top_k": 3},
            400,
            "max_token",
            "supplied: max_token, top_k (did you mean max_tokens for max_token?)",
        ),
        (  # the hint names what this route accepts
            at_completions({"model": MODEL_NAME, "prompt": "x", "stops": ["."]}),
            400,
            "stops",
            "supplied: stops (did you mean stop?)",
        ),
        ({"model": MODEL_NAME, "prompt": "x"}, 400, "prompt", "Unrecognized request argument"),
        ({"model": MODEL_NAME, "messages": CHAT, "stream": "yes"}, 400, "stream", "boolean"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "return_expert_weights": 1},
            400,
            "return_expert_weights",
            "boolean",
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "stream_options": {"include_usage": "no"}},
            400,
            "stream_options.include_usage",
            "boolean",
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "stream_options": {"foo": 1}},
            400,
            "stream_options.foo",
            "Unrecognized request argument supplied: stream_options.foo",
        ),
        (
            json.dumps({"model": MODEL_NAME, "messages": CHAT, "temperature": NAN}),
            400,
            "temperature",
            "nan",
        ),
        # values of another JSON type are refused, not converted, as OpenAI refuses them
        ({"model": MODEL_NAME, "messages": CHAT, "max_tokens": "12"}, 400, "max_tokens", "integer"),
        ({"model": MODEL_NAME, "messages": CHAT, "n": 2.0}, 400, "n", "integer"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "temperature": "0.5"},
            400,
            "temperature",
            "number",
        ),
        ({"model": MODEL_NAME, "messages": CHAT, "seed": "7"}, 400, "seed", "integer"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "fixed_expert_weights": {"bio": "1"}},
            400,
            "fixed_expert_weights.bio",
            "number",
        ),
        ({"model": MODEL_NAME, "messages": CHAT, "logprobs": 0}, 400, "logprobs", "leave"),
        # OpenAI's metadata fields are ignored, but only with their JSON types
        ({"model": MODEL_NAME, "messages": CHAT, "user": 5}, 400, "user", "string"),
        ({"model": MODEL_NAME, "messages": CHAT, "store": "yes"}, 400, "store", "boolean"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "metadata": {"run": 1}},
            400,
            "metadata.run",
            "string",
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "parallel_tool_calls": 0},
            400,
            "parallel_tool_calls",
            "boolean",
        ),
        ({"model": MODEL_NAME, "messages": CHAT, "service_tier": 1}, 400, "service_tier", "string"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "prompt_cache_key": ["k"]},
            400,
            "prompt_cache_key",
            "string",
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "safety_identifier": {}},
            400,
            "safety_identifier",
            "string",
        ),
        # a field of several types is named alone, not with the type it was tried as
        ({"model": MODEL_NAME, "messages": CHAT, "stop": 5}, 400, "stop", "string"),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": 5}]},
            400,
            "messages.0.content",
            "string",
        ),
        ({"model": MODEL_NAME, "messages": [{"content": "hi"}]}, 400, "messages.0.role", "missing"),
        # ... and a bad value inside a list is named by its index, not as "not a string"
        ({"model": MODEL_NAME, "messages": CHAT, "stop": [1]}, 400, "stop.0", "string (got 1)"),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            400,
            "messages.0.content.0.text",
            "missing",
        ),
        (
            {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            400,
            "messages.0.content.0.type",
            "'text' (got 'image_url')",
        ),
        (
            at_completions({"model": MODEL_NAME, "prompt": ["a", 1]}),
            400,
            "prompt.1",
            "string (got 1)",
        ),
        # token ids: one list or a list of them, each id in the vocabulary (320 tokens)
        (at_completions({"model": MODEL_NAME, "prompt": []}), 400, "prompt", "empty"),
        (at_completions({"model": MODEL_NAME, "prompt": [7, -1]}), 400, "prompt.1", "[0, 320)"),
        (at_completions({"model": MODEL_NAME, "prompt": [1, "a"]}), 400, "prompt.1", "integer"),
        (at_completions({"model": MODEL_NAME, "prompt": [[1, 2], []]}), 400, "prompt.1", "empty"),
        (at_completions({"model": MODEL_NAME, "prompt": ["a", ""]}), 400, "prompt.1", "empty"),
        (
            at_completions({"model": MODEL_NAME, "prompt": [[1], [2, 320]]}),
            400,
            "prompt.1.1",
            "[0, 320) (got 320)",
        ),
        (
            at_completions({"model": MODEL_NAME, "prompt": [[1], "a"]}),
            400,
            "prompt.1",
            "valid list (got 'a')",
        ),
        (
            at_completions({"model": MODEL_NAME, "prompt": [[1, "a"]]}),
            400,
            "prompt.0.1",
            "integer (got 'a')",
        ),
        # OpenAI parameters a client may send at their defaults: other values are refused
        (
            {"model": MODEL_NAME, "messages": CHAT, "modalities": ["text", "audio"]},
            400,
            "modalities",
            "leave",
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "reasoning_effort": "high"},
            400,
            "reasoning_effort",
            "leave",
        ),
        ({"model": MODEL_NAME, "messages": CHAT, "verbosity": "low"}, 400, "verbosity", "leave"),
        (
            {"model": MODEL_NAME, "messages": CHAT, "audio": {"voice": "alloy", "format": "wav"}},
            400,
            "audio",
            "leave",
        ),
        (
            {
                "model": MODEL_NAME,
                "messages": CHAT,
                "prediction": {"type": "content", "content": "4"},
            },
            400,
            "prediction",
            "leave",
        ),
        (
            {"model": MODEL_NAME, "messages": CHAT, "web_search_options": {}},
            400,
            "web_search_options",
            "leave",
        ),
    ],
)
def test_bad_requests_get_openai_errors(served, body, status, param, fix) -> None:
    route, body = body if isinstance(body, tuple) else ("/v1/chat/completions", body)
    response = post(served, body, route)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert fix in error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_no_hint_names_a_field_the_request_has(served) -> None:
    body = {"model": MODEL_NAME, "messages": CHAT, "mode": "frozen"}  # "mode" is close to "model"
    error = post(served, body).json()["error"]
    assert error["message"] == "Unrecognized request argument supplied: mode"


def test_openai_metadata_fields_change_nothing(client) -> None:
    plain = chat(client).choices[0].message.content
    tagged = chat(
        client,
        user="me",
        metadata={"run": "1"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        # unsupported parameters at their defaults
        logprobs=False,
        modalities=["text"],
        reasoning_effort="none",
        verbosity="medium",
        audio=None,
        prediction=None,
        web_search_options=None,
    )
    assert tagged.choices[0].message.content == plain


def test_unknown_stream_option_is_an_unknown_parameter(served) -> None:
    body = {"model": MODEL_NAME, "messages": CHAT, "stream_options": {"foo": 1}}
    error = post(served, body).json()["error"]
    assert error["code"] == "unknown_parameter"
    assert error["message"] == "Unrecognized request argument supplied: stream_options.foo"


def test_prompt_longer_than_the_context(served) -> None:
    response = post(served, {"model": MODEL_NAME, "prompt": "fox " * 400}, "/v1/completions")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"  # on chat: messages


def test_messages_longer_than_the_context(served) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "fox " * 400}]}
    error = post(served, body).json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


def test_client_sees_errors_as_exceptions(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        chat(client, top_p=0)


def test_health_and_metrics(served, client) -> None:
    chat(client)
    health = httpx.get(served[0].url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(served[0].url + "/metrics").text
    for name in (
        "loramix_requests_total",
        "loramix_generated_tokens_total",
        "loramix_batch_size_bucket",
        "loramix_queue_length",
        "loramix_request_latency_seconds_bucket",
        "loramix_time_to_first_token_seconds_count",
    ):
        assert name in text
    assert 'loramix_requests_total{route="chat",status="200"}' in text
    for phase in ("prefill", "decode"):  # the engine's forward time, by phase
        line = rf'^loramix_forward_seconds_total{{phase="{phase}"}} (\S+)$'
        seconds = re.search(line, text, re.M)
        assert seconds is not None and float(seconds.group(1)) > 0
    unknown = httpx.get(served[0].url + "/v1/nothing")
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_ignore_eos_generates_max_tokens(client) -> None:
    options = dict(model=MODEL_NAME, prompt="hello", max_tokens=40, temperature=0)
    ended = client.completions.create(**options)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 40
    full = client.completions.create(**options, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    assert full.choices[0].text.startswith(ended.choices[0].text)
