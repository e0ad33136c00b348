"""The floor under our gateway's per-request CPU: a bare ASGI proxy on the same server stack.

uvicorn with the gateway's settings (uvloop, our HTTP front with its header guards, access log off) and the
gateway's own upstream client (`gateway.upstream.UpstreamPool`, keep-alive), round-robin over the
engines, no keys, limits, metrics, flow control or routing. What our gateway spends per request above
this is the pipeline's; what this spends is the price of one Python event loop relaying HTTP.
`gateway_overhead.py --floor` runs it next to our gateway (docs/benchmarks.md).

    python benchmarks/gateway_floor.py --upstream http://127.0.0.1:8001 --upstream http://... \\
        --port 0 --ready-file ready.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
from pathlib import Path

import uvicorn
import uvloop

from inferstack.gateway.upstream import UpstreamPool
from inferstack.protocol.http_guard import guarded_protocol


class BareProxy:
    """POST bodies relayed whole to the next upstream in turn; the response relayed whole back."""

    def __init__(self, upstreams: list[str]):
        self.pools = [UpstreamPool(u, 5.0, 60.0) for u in upstreams]
        self.turn = itertools.cycle(self.pools)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        parts = []
        while True:
            msg = await receive()
            parts.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        conn = await next(self.turn).request(b"POST", scope["raw_path"], [(b"content-type", b"application/json")],
                                             b"".join(parts))
        data = await conn.read()
        status, ctype = conn.status, conn.content_type
        conn.release()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", action="append", required=True, help="engine base URL (repeat)")
    ap.add_argument("--port", type=int, default=0, help="0: any free port")
    ap.add_argument("--ready-file", type=Path, required=True, help="written with {\"urls\": [...]} once serving")
    args = ap.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(BareProxy(args.upstream), loop="uvloop", http=guarded_protocol(), lifespan="off",
                            access_log=False, log_level="warning", backlog=4096, proxy_headers=False,
                            server_header=False)
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.02)
        port = sock.getsockname()[1]
        args.ready_file.write_text(json.dumps({"urls": [f"http://127.0.0.1:{port}"]}) + "\n")
        await task

    uvloop.run(serve())


if __name__ == "__main__":
    main()
