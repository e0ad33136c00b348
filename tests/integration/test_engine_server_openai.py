"""`inferstack engine serve --model smollm2-135m` in a real process, driven by the official `openai`
client, httpx and schemathesis. One server process (a session fixture) serves every test here; the last sends it
SIGTERM while a request is in flight (drain, exit 0). It runs under Python's import profiler, so one test can
check what a real engine start imports.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import openai
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from inferstack.protocol.openapi import engine_openapi, schema_validator
from inferstack.protocol.sse import SSEDecoder
from support.procs import Server, inferstack_env, start_inferstack

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
KEY = "test-key"
MAX_MODEL_LEN = 1024
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session")
def server() -> Server:
    srv = start_inferstack(["engine", "serve", "--model", MODEL, "--threads", "1", "--dtype", "float32",
                            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-bytes", "128MiB",
                            "--api-key", KEY, "--log-format", "json", "--drain-timeout", "60"],
                           env=inferstack_env(PYTHONPROFILEIMPORTTIME="1"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def valid(name: str, body: dict, stream_chunk: bool = False) -> dict:
    errors = [e.message for e in schema_validator(name, stream_chunk=stream_chunk).iter_errors(body)]
    assert not errors, (errors, body)
    return body


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'^{re.escape(name)}{{{labels}[^}}]*model_name="{MODEL}"[^}}]*}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_until(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_ready_file_reports_the_real_port(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    assert port > 0 and server.ready["pid"] == server.proc.pid
    assert json.dumps(server.ready, separators=(",", ":")) in server.log()    # also printed to stdout
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_a_real_engine_never_imports_sympy(client: openai.OpenAI, server: Server) -> None:
    """Loading the model allocates its meta-device parameters with `torch.empty` (weights/loader.py: allocate):
    `nn.Module.to_empty` went through the meta `empty_like`, which imports torch's symbolic shapes and sympy,
    ~0.3 CPU s of every real engine start in the suite, the labs and `inferstack up`."""
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2
    imported = server.imported()
    assert {"torch", "safetensors", "tokenizers"} <= imported      # the profiler saw the model load
    assert "sympy" not in imported, "a real engine start imported sympy"


def test_chat_with_the_openai_client(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, temperature=0,
                                                            max_tokens=24)
    body = valid("CreateChatCompletionResponse", orjson.loads(raw.content))
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 24
    assert "cached_tokens" in usage["prompt_tokens_details"]
    # the same prompt again: its full blocks come from the prefix cache
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert again.choices[0].message.content == body["choices"][0]["message"]["content"]
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, n=2,
                                            stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = ["", ""], [None, None], None
    for chunk in stream:
        valid("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True), stream_chunk=True)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert all("Paris" in t for t in texts) and finishes == ["stop", "stop"]
    assert usage is not None and usage.completion_tokens > 0


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and len(content[0].top_logprobs) == 3
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-4)   # greedy


def test_completions_with_the_openai_client(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The capital of France is",
                                                      temperature=0, max_tokens=5, logprobs=2)
    body = valid("CreateCompletionResponse", orjson.loads(raw.content))
    assert "Paris" in body["choices"][0]["text"] and body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 5
    # a batch of token-id prompts and a string prompt list, n=2 each
    ids = client.post("/../tokenize", cast_to=object, body={"prompt": "One, two,", "add_special_tokens": False},
                      options={"headers": AUTH})["tokens"]
    batch = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=3, n=2, temperature=0, seed=1)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == 2 * len(ids)
    stream = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=3, stream=True,
                                       stream_options={"include_usage": True})
    seen = set()
    for chunk in stream:
        valid("CreateCompletionResponse", chunk.model_dump(exclude_unset=True), stream_chunk=True)
        seen |= {c.index for c in chunk.choices}
    assert seen == {0, 1} and chunk.usage is not None and chunk.usage.completion_tokens == 6


def test_sampling_knobs_are_accepted(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_completion_tokens=6, temperature=0.7, top_p=0.9, seed=3, stop=["\n"],
        presence_penalty=0.5, frequency_penalty=0.2,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 6,
                    "stop_token_ids": [2], "priority": 1, "cache_salt": "tenant-a", "skip_special_tokens": True})
    assert out.usage.completion_tokens == 6 or out.choices[0].finish_reason == "stop"
    same = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=42,
                                      temperature=1.0).choices[0].text for _ in range(2)]
    assert same[0] == same[1]


def test_errors(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION,
                                       tools=[{"type": "function", "function": {"name": "f g", "parameters": {}}}])
    assert bad.value.body["param"] == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "P", "strict": True, "schema": {"type": "object"}}})
    assert bad.value.body["message"] == ("Invalid schema for response_format 'P': In context=(), "
                                         "'additionalProperties' is required to be supplied and to be false.")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi " * 900, max_tokens=500)
    msg = bad.value.body["message"]
    assert str(MAX_MODEL_LEN) in msg and "in the prompt" in msg and "500 in the completion" in msg
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    resp = httpx.post(f"{server.url}/v1/completions", content=b"{nope", headers=AUTH)
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in server.log()


def test_models_tokenize_detokenize(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False},
                     headers=AUTH).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": "Hello world"}


def test_request_id_round_trip_and_json_logs(server: Server) -> None:
    resp = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                      headers={**AUTH, "x-request-id": "trace-me-42"})
    assert resp.headers["x-request-id"] == "trace-me-42" and resp.json()["id"].startswith("cmpl-trace-me-42-")
    assert httpx.get(f"{server.url}/health").headers["x-request-id"]       # generated when absent

    def logged() -> bool:
        for line in server.log().splitlines():
            if line.startswith("{") and '"trace-me-42"' in line:
                rec = json.loads(line)
                return rec["request_id"] == "trace-me-42" and "/v1/completions" in rec["msg"]
        return False

    assert wait_until(logged, 5)


def test_metrics_have_vllm_names(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
                 "vllm:external_prefix_cache_hits_total", "vllm:num_preemptions_total", "vllm:cache_config_info"]:
        assert f"\n{name}{{" in text, name
    assert metric(server, "vllm:prefix_cache_hits_total") >= 16
    assert metric(server, "vllm:request_success_total", 'finished_reason="stop",') >= 1
    for hist in ["time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time",
                 "request_prefill_time", "request_decode_time"]:
        assert metric(server, f"vllm:{hist}_seconds_count") > 0, hist


def test_disconnect_aborts_the_engine_request(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 900, "ignore_eos": True}
    with httpx.Client(headers=AUTH, timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as resp:
            dec = SSEDecoder()
            for chunk in resp.iter_bytes():
                if dec.feed(chunk):
                    break
            # polled: one run of the suite (loaded machine) read 0 here once; a request still streaming 900
            # tokens must show as running within seconds, whatever the scrape raced with
            assert wait_until(lambda: metric(server, "vllm:num_requests_running") == 1, 10)
        # 900 tokens take far longer than this wait: only an abort frees the slot this fast
        assert wait_until(lambda: metric(server, "vllm:num_requests_running") == 0, 10)

        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{server.url}/v1/completions", json=body, timeout=2)
        assert wait_until(lambda: metric(server, "vllm:num_requests_running") == 0, 10)
        assert metric(server, "vllm:kv_cache_usage_perc") == 0


def _encode_body(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    try:
        return json.dumps(body).encode()      # stdlib: fuzzers like integers beyond 64 bits
    except TypeError:                          # no body at all (schemathesis' NOT_SET)
        return b""


def _fuzz_schema():
    doc = engine_openapi()
    return schemathesis.openapi.from_dict(doc)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_schemathesis_finds_no_server_errors(server: Server, path: str, mode: schemathesis.GenerationMode) -> None:
    """Valid requests (per the official schemas) and invalid ones: never a 5xx, always an envelope."""
    op = _fuzz_schema()[path]["POST"]
    validator = {"/v1/chat/completions": "CreateChatCompletionResponse",
                 "/v1/completions": "CreateCompletionResponse"}.get(path)
    statuses: dict[int, int] = {}
    session = httpx.Client(headers=AUTH, timeout=120)

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=25 if mode.is_positive else 15, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        body = case.body
        if isinstance(body, dict):       # keep generation cheap on a CPU: the fuzz is about inputs
            body["model"] = MODEL
            body["stream"] = False
            for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2), ("best_of", 2)):
                if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                    body[key] = min(body[key], cap)
            prompt = body.get("prompt")
            if isinstance(prompt, list):        # a batch is one engine request per prompt: keep it small
                body["prompt"] = [p[:64] if isinstance(p, list | str) else p for p in prompt[:4]]
            # no limit fills the context: chat's default, and an explicit `"max_tokens": null` on either path (the
            # schema allows it; a completions body with it ran past the 120 s timeout on a loaded machine)
            if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
                body["max_tokens"] = 4
        resp = session.post(f"{server.url}{path}", content=_encode_body(body),
                            headers={"content-type": "application/json"})
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (body, resp.text)
        payload = resp.json()
        if resp.status_code >= 400:
            valid("ErrorResponse", payload)
        elif validator:
            valid(validator, payload)

    run()
    assert sum(statuses.values()) >= 10, statuses
    if not mode.is_positive:
        assert set(statuses) <= {200, 400, 404}, statuses


def test_sigterm_drains_in_flight_request_then_exits_0(server: Server) -> None:
    """Runs last: the module's server goes away here."""
    result: dict = {}

    def call() -> None:
        result["resp"] = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=120,
                                    json={"prompt": "Tell me a story.", "max_tokens": 40, "ignore_eos": True})

    t = threading.Thread(target=call)
    t.start()
    assert wait_until(lambda: metric(server, "vllm:num_requests_running") == 1, 20)
    server.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert server.proc.wait(60) == 0
    resp = result["resp"]
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 40
    assert "draining" in server.log()
