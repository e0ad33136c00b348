"""What the HTTP layer costs on top of the engine.

1. ``--mode instant``: an engine that returns tokens immediately, behind ``serve()``. The client's
   streaming rate is the HTTP layer's ceiling (µs per SSE chunk, all of it ours: parsing, chunk
   building, orjson, uvicorn).
2. ``--mode real``: the bundled model. The same workload runs directly on ``AsyncEngine.generate``
   and then through the server on that same engine instance (prefix caching off, so the second run
   gets no cache hits). The tokens/s ratio is the server's overhead.

    PYTHONPATH=src python benchmarks/engine_server_overhead.py --mode instant
    PYTHONPATH=src python benchmarks/engine_server_overhead.py --mode real --concurrency 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import AsyncIterator

import httpx

from inferstack.engine.outputs import FinishReason, RequestOutput
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.server import ServeOptions, serve
from inferstack.engine.stats import EngineStats
from inferstack.protocol.sse import SSEDecoder, is_done


class InstantEngine:
    """Answers every request with ``max_tokens`` single-token deltas, no model behind it."""

    model_name = "instant"
    max_model_len = 1 << 20

    class tokenizer:
        vocab_size = 256

        @staticmethod
        def encode(text: str, add_special_tokens: bool = False) -> list[int]:
            return list(text.encode())[:64]

        @staticmethod
        def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode(errors="replace")

        @staticmethod
        def apply_chat_template(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return "".join(m["content"] for m in messages)

    def stats(self) -> EngineStats:
        return EngineStats()

    async def abort(self, request_id: str) -> None:
        pass

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        t0 = time.monotonic()
        total = params.max_tokens or 16
        for i in range(total):
            await asyncio.sleep(0)
            now = time.monotonic()
            done = i == total - 1
            yield RequestOutput(request_id, 0, [97], "a", FinishReason.LENGTH if done else None,
                                num_prompt_tokens=len(prompt_token_ids), num_output_tokens=i + 1,
                                metrics={"arrival": t0, "scheduled": t0, "first_token": t0, "now": now,
                                         **({"finished": now} if done else {})})


def start_in_thread(factory) -> str:
    url: list[str] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.run(serve(factory, ServeOptions(port=0), on_listening=lambda u: url.append(u)))

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ready.is_set():
        if url and httpx.get(f"{url[0]}/ready").status_code == 200:
            ready.set()
        time.sleep(0.1)
    return url[0]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> int:
    chunks = 0
    dec = SSEDecoder()
    async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        async for raw in resp.aiter_bytes():
            for payload in dec.feed(raw):
                if not is_done(payload):
                    chunks += 1
    return chunks


async def http_run(url: str, concurrency: int, body: dict) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(stream_one(client, url, body) for _ in range(concurrency)))
        return time.perf_counter() - t0, sum(counts)


def instant(args: argparse.Namespace) -> None:
    url = start_in_thread(InstantEngine)
    body = {"model": "instant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": args.max_tokens}
    asyncio.run(http_run(url, 1, {**body, "max_tokens": 200}))       # warm up
    for conc in (1, args.concurrency):
        secs, chunks = asyncio.run(http_run(url, conc, body))
        print(f"instant engine, {conc} stream(s) x {args.max_tokens} tokens: {chunks / secs:,.0f} chunks/s "
              f"({secs / chunks * 1e6:.0f} µs per chunk, client included)")


def real(args: argparse.Namespace) -> None:
    import torch

    from inferstack.engine.async_engine import AsyncEngine
    from inferstack.engine.config import EngineConfig

    torch.set_num_threads(args.threads)
    engine = AsyncEngine.from_config(EngineConfig(model=args.model, num_threads=args.threads,
                                                  enable_prefix_caching=False, max_model_len=2048))
    prompts = [f"Write a short story about robot number {i}." for i in range(args.concurrency)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    async def direct() -> tuple[float, int]:
        async def one(i: int) -> int:
            ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompts[i]}], add_generation_prompt=True))
            n = 0
            async for out in engine.generate(ids, params, f"direct-{i}-{time.monotonic_ns()}"):
                n += len(out.new_token_ids)
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(args.concurrency)))
        return time.perf_counter() - t0, sum(counts)

    url_box: list[str] = []

    async def through_http() -> tuple[float, int]:
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(i: int) -> int:
                body = {"model": engine.model_name, "messages": [{"role": "user", "content": prompts[i]}],
                        "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                        "stream_options": {"include_usage": True}}
                await stream_one(client, url_box[0], body)
                return args.max_tokens

            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(i) for i in range(args.concurrency)))
            return time.perf_counter() - t0, sum(counts)

    async def main() -> None:
        stop = asyncio.Event()
        server = asyncio.ensure_future(serve(lambda: engine, ServeOptions(port=0), stop=stop,
                                             on_listening=url_box.append))
        while not url_box:
            await asyncio.sleep(0.05)
        await direct()                                   # warm up
        rows = []
        for _ in range(args.rounds):
            d_secs, d_tok = await direct()
            h_secs, h_tok = await through_http()
            rows.append((d_tok / d_secs, h_tok / h_secs))
        for d, h in rows:
            print(f"direct AsyncEngine {d:.1f} tok/s | through HTTP+SSE {h:.1f} tok/s | ratio {h / d:.3f}")
        stop.set()
        await server

    asyncio.run(main())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["instant", "real"], default="instant")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    main_args = ap.parse_args()
    (instant if main_args.mode == "instant" else real)(main_args)
