"""A scripted OpenAI-compatible server: the peer for client-capacity benchmarks and bench tests.

It answers `/v1/completions` and `/v1/chat/completions` (streamed or not) with exactly `max_tokens`
tokens after a fixed TTFT and inter-token gap, so measured metrics can be checked against known truth;
`--mode error|stall` gives a server that fails or hangs. It is a bare asyncio protocol, so that one
core serves thousands of requests per second. Run: `python -m inferstack.bench.testserver --port 0`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import orjson

from inferstack.fileio import write_ready_file

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


class State:
    def __init__(self, model: str, ttft_s: float, itl_s: float, mode: str) -> None:
        self.model, self.ttft_s, self.itl_s, self.mode = model, ttft_s, itl_s, mode
        self.running = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def metrics(self) -> bytes:
        label = f'{{model_name="{self.model}"}}'
        return (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{label} {self.running}\n"
                f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{label} 0\n"
                f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{label} 0\n"
                f"# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total{label} {self.prompt_tokens}\n"
                f"# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{label} {self.generation_tokens}\n"
                ).encode()


def _response(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, _REASONS.get(status, "Error").encode(), ctype, len(body))) + body


def _error(status: int, message: str) -> bytes:
    return _response(status, orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                                     "param": None, "code": None}}))


class HTTPProtocol(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False        # one request at a time per connection (no pipelining needed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        while not self.busy:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4: head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self._handle(method, path, body)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _handle(self, method: str, path: str, body: bytes) -> None:
        st = self.state
        if method == "GET":
            if path == "/v1/models":
                self._write(_response(200, orjson.dumps({"object": "list", "data": [
                    {"id": st.model, "object": "model", "owned_by": "inferstack-bench"}]})))
            elif path in ("/health", "/ready"):
                self._write(_response(200, b"{}"))
            elif path == "/metrics":
                self._write(_response(200, st.metrics(), b"text/plain; version=0.0.4"))
            else:
                self._write(_error(404, f"no route {path}"))
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._write(_error(404, f"no route {path}"))
            return
        if st.mode == "error":
            self._write(_error(500, "scripted failure (testserver --mode error)"))
            return
        try:
            req = orjson.loads(body)
            n = int(req.get("max_tokens") or 16)
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            self._write(_error(400, "body is not a JSON object with an integer max_tokens"))
            return
        chat = path.endswith("chat/completions")
        text = " ".join(m.get("content", "") for m in req.get("messages", [])) if chat else str(req.get("prompt", ""))
        prompt_tokens = len(text.split())
        st.requests += 1
        st.prompt_tokens += prompt_tokens
        if st.mode == "stall":
            return             # accept and never answer
        self.busy = True
        asyncio.get_running_loop().create_task(self._complete(chat, bool(req.get("stream")), n, prompt_tokens))

    async def _complete(self, chat: bool, stream: bool, n: int, prompt_tokens: int) -> None:
        st = self.state
        st.running += 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        start = time.perf_counter()
        try:
            if not stream:
                delay = st.ttft_s + max(0, n - 1) * st.itl_s
                if delay > 0:
                    await asyncio.sleep(delay)
                text = " tok" * n
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length"})
                self._write(_response(200, orjson.dumps({"id": "cmpl-bench", "object": "chat.completion" if chat
                                                         else "text_completion", "model": st.model,
                                                         "choices": [choice], "usage": usage})))
                return
            self._write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            obj = "chat.completion.chunk" if chat else "text_completion"
            for i in range(n):
                wait = start + st.ttft_s + i * st.itl_s - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                choice = ({"index": 0, "delta": {"content": " tok"}, "finish_reason": None} if chat
                          else {"index": 0, "text": " tok", "finish_reason": None})
                self._chunk(orjson.dumps({"id": "cmpl-bench", "object": obj, "model": st.model, "choices": [choice]}))
            self._chunk(orjson.dumps({"id": "cmpl-bench", "object": obj, "model": st.model, "choices": [],
                                      "usage": usage}))
            self._chunk(b"[DONE]")
            self._write(b"0\r\n\r\n")
        finally:
            st.running -= 1
            st.generation_tokens += n
            self.busy = False
            self._next()

    def _chunk(self, data: bytes) -> None:
        payload = b"data: " + data + b"\n\n"
        self._write(b"%x\r\n%s\r\n" % (len(payload), payload))


async def serve(args: argparse.Namespace) -> None:
    state = State(args.model, args.ttft_ms / 1e3, args.itl_ms / 1e3, args.mode)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HTTPProtocol(state), args.host, args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    write_ready_file(args.ready_file, {"urls": [f"http://{args.host}:{port}"], "pid": os.getpid()})
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file")
    p.add_argument("--model", default="bench-test-model")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--mode", choices=("ok", "error", "stall"), default="ok")
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.run(serve(args))
    except ImportError:   # pragma: no cover
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
