"""CPU per request of an HTTP front alone: one constant JSON answer, no pipeline, no upstream.

Three servers in their own processes, loaded in turn (runs interleaved, so load drifts from other work hit
all alike) by an aiohttp client at ``--concurrency``: uvicorn's own httptools protocol, our front
(`protocol/http_front.py` under uvicorn, as the gateway and the engine run it) and a bare asyncio protocol
on httptools that parses and answers with no ASGI at all (the floor of a Python front on this loop).
CPU µs per request is the server process's user + system time over ``--total`` requests.

    python benchmarks/http_front_cost.py [--total 2000] [--concurrency 64] [--reps 6]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import time

import aiohttp
import httptools
import psutil
import uvicorn
import uvloop

from inferstack.protocol.http_guard import guarded_protocol

ANSWER = b'{"id":"x","object":"chat.completion","choices":[]}' * 6


async def asgi_app(scope: dict, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]})
    await send({"type": "http.response.body", "body": ANSWER})


class BareProtocol(asyncio.Protocol):
    """Parse with httptools, answer each complete request with one write: no scope, task or cycle."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(ANSWER), ANSWER))


def serve(kind: str, sock: socket.socket) -> None:
    if kind == "bare":
        async def bare() -> None:
            server = await asyncio.get_running_loop().create_server(BareProtocol, sock=sock)
            await server.serve_forever()
        uvloop.run(bare())
        return
    http = guarded_protocol() if kind == "ours" else "httptools"
    config = uvicorn.Config(asgi_app, loop="uvloop", http=http, lifespan="off", access_log=False,
                            log_level="warning", proxy_headers=False, server_header=False)
    uvloop.run(uvicorn.Server(config).serve(sockets=[sock]))


async def load(url: str, total: int, concurrency: int) -> None:
    left = total
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=b"x" * 400) as r:
                    await r.read()
                    assert r.status == 200, r.status
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            asyncio.run(load(f"http://127.0.0.1:{port}/", 1, 1))
            return
        except (OSError, aiohttp.ClientError):
            time.sleep(0.1)
    raise TimeoutError(f"no server on port {port}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=2000, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--reps", type=int, default=6, help="runs per server (interleaved); the median is reported")
    args = ap.parse_args()
    names = {"uvicorn": "uvicorn httptools protocol", "ours": "our front (http_front.py)",
             "bare": "bare httptools protocol, no ASGI"}
    servers = {}
    for kind in names:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        proc = multiprocessing.Process(target=serve, args=(kind, sock), daemon=True)
        proc.start()
        servers[kind] = (proc, sock.getsockname()[1])
    try:
        for _, port in servers.values():
            wait_listening(port)
        samples: dict[str, list[float]] = {k: [] for k in servers}
        for _ in range(args.reps):
            for kind, (proc, port) in servers.items():
                p = psutil.Process(proc.pid)
                cpu0 = sum(p.cpu_times()[:2])
                asyncio.run(load(f"http://127.0.0.1:{port}/v1/chat/completions", args.total, args.concurrency))
                samples[kind].append((sum(p.cpu_times()[:2]) - cpu0) / args.total * 1e6)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.join(10)
    print(f"| server | c{args.concurrency} CPU µs/req (median of {args.reps}) | runs |\n|---|---:|---|")
    for kind, v in samples.items():
        print(f"| {names[kind]} | {statistics.median(v):.0f} | {', '.join(f'{x:.0f}' for x in v)} |")


if __name__ == "__main__":
    main()
