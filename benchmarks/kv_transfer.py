"""KV transfer engine throughput over loopback: TCP vs the /dev/shm fast path.

Moves one request's prompt KV (SmolLM2-135M shape by default: 30 layers, 3 KV heads, head_dim 64,
fp32, 16-token blocks) from a PagedKVSource to a client that copies each chunk into its own
paged cache (what a decode engine does), and reports GB/s and time per transfer.

    python benchmarks/kv_transfer.py --tokens 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from inferstack.engine.connector.blocks import scatter_into_blocks
from inferstack.engine.connector.transfer import KVTransferClient, KVTransferServer, PagedKVSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bs = 16
    nblocks = args.tokens // bs
    caches = [torch.randn(2, nblocks + 8, bs, args.kv_heads, args.head_dim) for _ in range(args.layers)]
    dst = [torch.zeros_like(c) for c in caches]
    source = PagedKVSource(caches)
    server = KVTransferServer(source)
    host, port = server.address
    blocks = list(range(4, 4 + nblocks))
    print(f"{args.tokens} tokens = {nblocks} blocks, {source.layout.chunk_bytes(nblocks) / 1e6:.1f} MB per transfer")
    results: dict[str, list[tuple[float, float]]] = {}
    for transport in ("tcp", "shm", "tcp", "shm"):     # interleaved so machine noise hits both
        client = KVTransferClient(source.layout, allow_shm=transport == "shm")
        for r in range(args.repeats):
            rid = f"{transport}-{r}-{time.monotonic_ns()}"
            source.hold(rid, blocks)
            t0 = time.perf_counter()
            pull = client.pull(host, port, rid)
            for chunk in pull:
                scatter_into_blocks(dst, blocks[chunk.first_block:chunk.first_block + chunk.num_blocks], chunk.tensor)
            dt = time.perf_counter() - t0
            assert pull.result.complete and pull.result.transport == transport
            results.setdefault(transport, []).append((dt, pull.result.bytes / dt / 1e9))
    assert all(torch.equal(a[:, 4:4 + nblocks], b[:, 4:4 + nblocks]) for a, b in zip(caches, dst, strict=True))
    for transport, rs in results.items():
        secs = [s for s, _ in rs]
        gbps = [g for _, g in rs]
        print(f"{transport}: median {statistics.median(secs) * 1e3:.1f} ms per transfer, "
              f"median {statistics.median(gbps):.2f} GB/s (best {max(gbps):.2f}) over {len(rs)} transfers")
    server.close()


if __name__ == "__main__":
    main()
