"""A small OpenAI-compatible engine stand-in for gateway tests (an edge mock, not the product).

It serves /v1/models, /v1/chat/completions and /v1/completions (streaming and not, with usage),
/metrics with vLLM names (running, waiting, KV use derived from live load), /tokenize, /health and
/debug/requests (the bodies it received, and the most requests it ran at once), with configurable
latency and a concurrency cap that makes requests wait (so `vllm:num_requests_waiting` is real).

Run: python gateway_fake_engine.py --model m --port 0 --ready-file F [--ttft-ms 5 --itl-ms 1 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections import OrderedDict, deque

from aiohttp import web

from inferstack.fileio import write_ready_file


def build_app(args: argparse.Namespace) -> web.Application:
    state = {"running": 0, "waiting": 0, "prefill_queued": 0, "peak_load": 0, "bodies": [], "served": 0, "hits": 0,
             "queries": 0, "peak_running": 0}
    # (monotonic time, +1 arrived / -1 finished): tests merge engines' logs into the pool's load over time
    load_changes: deque[tuple[float, int]] = deque(maxlen=20_000)
    prefixes: OrderedDict[tuple, None] = OrderedDict()
    sem = asyncio.Semaphore(args.max_running)
    prefill_lock = asyncio.Lock() if args.serial_prefill else contextlib.nullcontext()

    def usage(prompt_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": args.tokens,
                "total_tokens": prompt_tokens + args.tokens}

    def prompt_text(body: dict) -> str:
        if "messages" in body:
            return "".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
        return str(body.get("prompt", ""))

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("messages" if chat else "prompt"), (list, str)):
            return web.json_response({"error": {"message": "missing messages/prompt", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        if args.fail_status:
            return web.json_response({"error": {"message": "injected failure", "type": "server_error",
                                                "param": None, "code": None}}, status=args.fail_status)
        state["bodies"].append(body)
        del state["bodies"][:-200]
        text = prompt_text(body)
        ptoks = max(1, len(text) // 4)
        # prefix cache: an LRU of prompt heads (first 256 chars, per cache_salt); a hit skips the
        # prefill cost of all but the last 100 tokens
        key = (body.get("cache_salt"), text[:256])
        hit = key in prefixes
        prefixes[key] = None
        prefixes.move_to_end(key)
        while len(prefixes) > args.cache_entries:
            prefixes.popitem(last=False)
        state["hits"] += hit
        state["queries"] += 1
        state["waiting"] += 1
        load_changes.append((time.monotonic(), 1))
        state["peak_load"] = max(state["peak_load"], state["waiting"] + state["running"])
        async with sem:
            state["waiting"] -= 1
            state["running"] += 1
            state["peak_running"] = max(state["peak_running"], state["running"])
            try:
                uncached = min(ptoks, 100) if hit else ptoks
                prefill = args.ttft_ms / 1000 + uncached * args.prefill_us_per_token / 1e6
                state["prefill_queued"] += 1
                queued = True
                try:
                    async with prefill_lock:  # --serial-prefill: queued here shows as waiting, like an engine's
                        state["prefill_queued"] -= 1
                        queued = False
                        await asyncio.sleep(prefill)
                finally:
                    if queued:
                        state["prefill_queued"] -= 1
                rid = f"cmpl-{os.getpid()}-{state['served']}"
                state["served"] += 1
                model = body.get("model")
                obj = "chat.completion" if chat else "text_completion"
                if not body.get("stream"):
                    await asyncio.sleep(args.itl_ms * (args.tokens - 1) / 1000)
                    choice = ({"index": 0, "message": {"role": "assistant", "content": "x" * args.tokens},
                               "finish_reason": "length", "logprobs": None} if chat else
                              {"index": 0, "text": "x" * args.tokens, "finish_reason": "length", "logprobs": None})
                    return web.json_response({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                                              "choices": [choice], "usage": usage(ptoks),
                                              "served_by": request.url.port})
                resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
                await resp.prepare(request)
                cobj = "chat.completion.chunk" if chat else "text_completion"
                for i in range(args.tokens):
                    if i:
                        await asyncio.sleep(args.itl_ms / 1000)
                    delta = ({"index": 0, "delta": {"content": "x"}, "finish_reason": None} if chat
                             else {"index": 0, "text": "x", "finish_reason": None})
                    if i == args.tokens - 1:
                        delta["finish_reason"] = "length"
                    await resp.write(b"data: " + json.dumps({"id": rid, "object": cobj, "created": 0, "model": model,
                                                             "choices": [delta]}).encode() + b"\n\n")
                    if args.die_after_tokens and i + 1 >= args.die_after_tokens:
                        os._exit(1)
                so = body.get("stream_options") or {}
                if so.get("include_usage"):
                    await resp.write(b"data: " + json.dumps({"id": rid, "object": cobj, "created": 0, "model": model,
                                                             "choices": [], "usage": usage(ptoks)}).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                if args.end_delay_ms:  # a stream that ends a while after its [DONE] (a slow engine's teardown)
                    await asyncio.sleep(args.end_delay_ms / 1000)
                await resp.write_eof()
                return resp
            finally:
                state["running"] -= 1
                load_changes.append((time.monotonic(), -1))

    async def chat(request: web.Request) -> web.StreamResponse:
        return await generate(request, True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, False)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                              "owned_by": "fake"} for m in args.model]})

    def metrics_text() -> str:
        if args.kv_metric == "cache":  # prefix-cache occupancy: stays high while idle
            kv = len(prefixes) / args.cache_entries
        else:
            kv = min(1.0, (state["running"] + state["waiting"]) / max(1, args.max_running * 2))
        m = args.model[0]
        # the running batch's cap: with --serial-prefill one request starts at a time, the rest waits for it
        cap = 1 if args.serial_prefill else args.max_running
        running, waiting = state["running"] - state["prefill_queued"], state["waiting"] + state["prefill_queued"]
        return (f'vllm:num_requests_running{{model_name="{m}"}} {running}\n'
                f'vllm:num_requests_waiting{{model_name="{m}"}} {waiting}\n'
                f'vllm:kv_cache_usage_perc{{model_name="{m}"}} {kv}\n'
                f'inferstack:max_num_seqs{{model_name="{m}"}} {cap}\n'
                f'vllm:prefix_cache_hits_total{{model_name="{m}"}} {state["hits"]}\n'
                f'vllm:prefix_cache_queries_total{{model_name="{m}"}} {state["queries"]}\n')

    lagged = {"at": 0.0, "text": ""}

    async def metrics(request: web.Request) -> web.Response:
        if args.no_metrics:
            return web.Response(status=404)
        if args.metrics_delay_ms:  # a metrics endpoint slower than the gateway's scrape timeout
            await asyncio.sleep(args.metrics_delay_ms / 1000)
        now = time.monotonic()
        if now - lagged["at"] >= args.metrics_lag_ms / 1000:  # gauges updated once per "step"
            lagged["at"], lagged["text"] = now, metrics_text()
        return web.Response(text=lagged["text"], content_type="text/plain")

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        toks = list(prompt_text(body).encode())
        return web.json_response({"count": len(toks), "max_model_len": 4096, "tokens": toks})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def debug(request: web.Request) -> web.Response:
        return web.json_response({"bodies": state["bodies"], "served": state["served"], "hits": state["hits"],
                                  "peak_running": state["peak_running"], "peak_load": state["peak_load"],
                                  "load_changes": list(load_changes)})

    @web.middleware
    async def require_key(request: web.Request, handler):
        """--api-key: answer /v1/* like a hosted provider does without the right bearer key."""
        if args.api_key and request.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {args.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided.",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "invalid_api_key"}}, status=401)
        return await handler(request)

    app = web.Application(client_max_size=64 << 20, middlewares=[require_key])
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/debug/requests", debug)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="e.g. 127.0.0.2 to stand in for a pod IP")
    p.add_argument("--ready-file")
    p.add_argument("--ttft-ms", type=float, default=2.0)
    p.add_argument("--itl-ms", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--prefill-us-per-token", type=float, default=0.0)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--cache-entries", type=int, default=1024, help="prompt heads the prefix cache holds")
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--api-key", default="", help="require this bearer key on /v1/* (a hosted provider stand-in)")
    p.add_argument("--die-after-tokens", type=int, default=0)
    p.add_argument("--end-delay-ms", type=float, default=0.0, help="end a stream this long after its [DONE]")
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--metrics-delay-ms", type=float, default=0.0, help="answer /metrics this late")
    p.add_argument("--metrics-lag-ms", type=float, default=0.0,
                   help="refresh the /metrics values at most this often (a CPU engine updates them per step)")
    p.add_argument("--kv-metric", choices=["load", "cache"], default="load",
                   help="what vllm:kv_cache_usage_perc reports: live load, or prefix-cache occupancy")
    p.add_argument("--serial-prefill", action="store_true",
                   help="one prefill at a time (an engine's prefill queue); requests queued for it count as waiting")
    args = p.parse_args()
    args.model = args.model or ["fake-model"]

    async def run() -> None:
        runner = web.AppRunner(build_app(args), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        write_ready_file(args.ready_file, {"urls": [f"http://{args.host}:{port}"], "pid": os.getpid()})
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
