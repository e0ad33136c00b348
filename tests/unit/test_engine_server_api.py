"""The engine server's HTTP behaviour against a scripted fake engine (edge of the unit tests).

The same behaviour is checked against the real engine and model in
tests/integration/test_engine_server_openai.py.
"""

from __future__ import annotations

import orjson
import pytest
from engine_server_fake import FakeEngine
from starlette.testclient import TestClient

from inferstack.engine.server import ServerState, build_app
from inferstack.protocol.openapi import schema_validator
from inferstack.protocol.sse import SSEDecoder, is_done

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def make(engine: FakeEngine | None = None, api_key: str | None = None) -> tuple[TestClient, ServerState, FakeEngine]:
    engine = engine or FakeEngine()
    state = ServerState(api_key=api_key)
    state.attach(engine)
    return TestClient(build_app(state), raise_server_exceptions=False), state, engine


def valid(name: str, body: dict, stream_chunk: bool = False) -> dict:
    errors = [e.message for e in schema_validator(name, stream_chunk=stream_chunk).iter_errors(body)]
    assert not errors, (errors, body)
    return body


def sse(text: bytes) -> list[dict]:
    payloads = SSEDecoder().feed(text)
    assert is_done(payloads[-1]), payloads[-3:]
    return [orjson.loads(p) for p in payloads[:-1]]


def assert_error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    valid("ErrorResponse", body)
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def chat_body(**kw) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], **kw}


def test_chat_completion_round_trip() -> None:
    client, _, engine = make()
    body = valid("CreateChatCompletionResponse", client.post(CHAT, json=chat_body(max_tokens=50)).json())
    # the fake answers the prompt's last 8 bytes reversed: "<user>hello\n<assistant>" -> ">tnatsis"
    assert body["choices"][0]["message"]["content"] == ">tnatsis"
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_len = len(engine.calls[0][0])
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 9, "total_tokens": prompt_len + 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_chat_sampling_fields_reach_the_engine() -> None:
    client, _, engine = make()
    resp = client.post(CHAT, json=chat_body(max_completion_tokens=3, temperature=0.5, top_p=0.9, top_k=4, min_p=0.05,
                                            seed=7, stop=["x"], presence_penalty=0.5, frequency_penalty=0.1,
                                            repetition_penalty=1.2, ignore_eos=True, min_tokens=1,
                                            stop_token_ids=[3], priority=-2, cache_salt="tenant",
                                            skip_special_tokens=False, n=2),
                       headers={"x-request-id": "abc"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "abc"
    _, params, rid, priority, salt = engine.calls[0]
    assert rid.startswith("abc-") and (priority, salt) == (-2, "tenant")
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (
        3, 0.5, 0.9, 4, 0.05, 7)
    assert (params.stop, params.stop_token_ids, params.ignore_eos, params.min_tokens, params.n) == (
        ["x"], [3], True, 1, 2)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.1, 1.2)
    assert [c["finish_reason"] for c in resp.json()["choices"]] == ["length", "length"]


def test_chat_default_max_tokens_fills_the_context() -> None:
    client, _, engine = make(FakeEngine(max_model_len=100))
    client.post(CHAT, json=chat_body())
    prompt, params, *_ = engine.calls[0]
    assert params.max_tokens == 100 - len(prompt)


def test_chat_stream_chunks_and_usage() -> None:
    client, _, _ = make()
    resp = client.post(CHAT, json=chat_body(stream=True, n=2, stream_options={"include_usage": True}))
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = sse(resp.content)
    for c in chunks:
        valid("CreateChatCompletionStreamResponse", c, stream_chunk=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in c for c in chunks) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 18
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == ">tnatsis"
        assert [ch["finish_reason"] for ch in mine][-1] == "stop"
        assert all(ch["finish_reason"] is None for ch in mine[:-1])


def test_chat_logprobs() -> None:
    client, _, _ = make()
    body = client.post(CHAT, json=chat_body(logprobs=True, top_logprobs=2, max_tokens=3)).json()
    valid("CreateChatCompletionResponse", body)
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [">", "t", "n"] and len(content[0]["top_logprobs"]) == 2
    chunks = sse(client.post(CHAT, json=chat_body(logprobs=True, top_logprobs=1, max_tokens=2, stream=True)).content)
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]) == 2


def test_completions_forms_and_batch() -> None:
    client, _, engine = make()
    body = valid("CreateCompletionResponse",
                 client.post(COMPLETIONS, json={"model": "fake-model", "prompt": "abc"}).json())
    assert body["choices"][0]["text"] == "cba" and body["usage"]["prompt_tokens"] == 3
    body = client.post(COMPLETIONS, json={"prompt": [[97, 98], [120]], "n": 2, "max_tokens": 5}).json()
    valid("CreateCompletionResponse", body)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ba"), (1, "ba"), (2, "x"), (3, "x")]
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 3 + 3 + 2 + 2
    assert len({call[2] for call in engine.calls[-2:]}) == 2     # one engine request per prompt


def test_completions_stream_and_logprobs() -> None:
    client, _, _ = make()
    resp = client.post(COMPLETIONS, json={"prompt": "xyz", "stream": True, "logprobs": 2,
                                          "stream_options": {"include_usage": True}})
    chunks = sse(resp.content)
    for c in chunks:
        valid("CreateCompletionResponse", c, stream_chunk=True)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "zyx"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    body = client.post(COMPLETIONS, json={"prompt": "xyz", "logprobs": 1}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"][:3] == ["z", "y", "x"] and lp["text_offset"][:3] == [0, 1, 2]


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    (CHAT, chat_body(temperature=-1), 400, "temperature"),
    (CHAT, chat_body(top_p=0), 400, "top_p"),
    (CHAT, chat_body(n=0), 400, "n"),
    (CHAT, chat_body(n=100000), 400, "n"),
    (CHAT, chat_body(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat_body(temperature="hot"), 400, "temperature"),
    (CHAT, chat_body(model="gpt-4"), 404, "model"),
    (CHAT, chat_body(tools=[{"type": "code", "function": {"name": "f"}}]), 400, "tools[0].type"),
    (CHAT, chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]), 400, "tools[0].function.name"),
    (CHAT, chat_body(tool_choice="required"), 400, "tool_choice"),
    (CHAT, chat_body(response_format={"type": "xml"}), 400, "response_format.type"),
    (CHAT, chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                             "schema": {"type": "object"}}}),
     400, "response_format"),
    (CHAT, chat_body(guided_regex="a+", guided_choice=["a"]), 400, "guided_choice"),
    (CHAT, chat_body(logit_bias={"1": 2.0}), 400, "logit_bias"),
    (CHAT, chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
    (CHAT, chat_body(min_tokens=9, max_tokens=2), 400, "min_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    (COMPLETIONS, {"prompt": "x", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, 999]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [5, 100000]}, 400, "tokens"),
])
def test_errors_are_envelopes_with_param(path: str, body: dict, status: int, param: str) -> None:
    client, _, _ = make()
    err = assert_error(client.post(path, json=body), status, param)
    if "not supported" in err["message"]:
        assert "not supported yet" in err["message"]


def test_context_length_error_states_both_lengths() -> None:
    client, _, _ = make(FakeEngine(max_model_len=64))
    err = assert_error(client.post(COMPLETIONS, json={"prompt": "a" * 40, "max_tokens": 30}), 400, "max_tokens")
    assert "64" in err["message"] and "40 in the prompt" in err["message"] and "30 in the completion" in err["message"]
    assert err["code"] == "context_length_exceeded"
    err = assert_error(client.post(COMPLETIONS, json={"prompt": "a" * 70}), 400, "prompt")
    assert "64" in err["message"] and "70" in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"", b'{"prompt": "x", "n": "2"}'])
def test_malformed_json_is_400(raw: bytes) -> None:
    client, _, _ = make()
    assert_error(client.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"}), 400)


def test_unknown_route_and_method_are_envelopes() -> None:
    client, _, _ = make()
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.get(CHAT), 405)


def test_api_key() -> None:
    client, _, _ = make(api_key="sekret")
    assert_error(client.post(CHAT, json=chat_body()), 401)
    assert_error(client.post(CHAT, json=chat_body(), headers={"authorization": "Bearer wrong"}), 401)
    assert client.post(CHAT, json=chat_body(), headers={"authorization": "Bearer sekret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_not_ready_is_503() -> None:
    state = ServerState()
    client = TestClient(build_app(state))
    assert client.get("/health").status_code == 200
    assert_error(client.get("/ready"), 503)
    assert_error(client.post(CHAT, json=chat_body()), 503)
    state.attach(FakeEngine())
    assert client.get("/ready").status_code == 200
    state.draining = True
    assert_error(client.get("/ready"), 503)


def test_internal_error_is_an_envelope_without_traceback() -> None:
    class Broken(FakeEngine):
        def generate(self, *a, **kw):
            raise RuntimeError("secret internals")

    client, _, _ = make(Broken())
    err = assert_error(client.post(CHAT, json=chat_body()), 500)
    assert "secret" not in err["message"] and "Traceback" not in err["message"]


def test_models_tokenize_detokenize() -> None:
    client, _, _ = make()
    valid("ListModelsResponse", client.get("/v1/models").json())
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake-model"
    tok = client.post("/tokenize", json={"prompt": "hi", "return_token_strs": True}).json()
    assert tok == {"count": 2, "max_model_len": 512, "tokens": [104, 105], "token_strs": ["h", "i"]}
    chat_tok = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["count"] == len("<user>hi\n<assistant>")
    assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert_error(client.post("/tokenize", json={}), 400, "prompt")


def test_metrics_names_and_observations() -> None:
    client, _, _ = make()
    client.post(COMPLETIONS, json={"prompt": "abcd", "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
                 "vllm:external_prefix_cache_hits_total", "vllm:num_preemptions_total"]:
        assert f'{name}{{model_name="fake-model"}}' in text, name
    assert 'vllm:request_success_total{finished_reason="length",model_name="fake-model"} 1.0' in text
    assert 'vllm:cache_config_info{block_size="16",model_name="fake-model",num_gpu_blocks="64"} 1.0' in text
    assert 'vllm:prompt_tokens_total{model_name="fake-model"} 4.0' in text
    for hist, count in [("time_to_first_token", 1), ("inter_token_latency", 2), ("e2e_request_latency", 1),
                        ("request_queue_time", 1), ("request_prefill_time", 1), ("request_decode_time", 1)]:
        assert f'vllm:{hist}_seconds_count{{model_name="fake-model"}} {count}.0' in text, hist


def test_openapi_is_served() -> None:
    client, _, _ = make()
    doc = client.get("/openapi.json").json()
    assert "/v1/chat/completions" in doc["paths"] and "CreateCompletionRequest" in doc["components"]["schemas"]


def test_request_id_is_generated_or_sanitized() -> None:
    client, _, engine = make()
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32
    resp = client.post(COMPLETIONS, json={"prompt": "a"}, headers={"x-request-id": "a b\tc" + "x" * 300})
    rid = resp.headers["x-request-id"]
    assert rid.startswith("a_b_c") and len(rid) == 128
    assert engine.calls[-1][2].startswith(rid + "-")


def test_oversized_body_is_413() -> None:
    client, _, _ = make()
    big = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
    assert_error(client.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413)
