"""`network`: how fast KV moves between engines, by transfer size and transport.

The project's own KV transfer engine (`engine/connector/transfer.py`, what a decode engine pulls a
prefill engine's KV with) moves one request's KV — the bundled SmolLM2-135M's shape, fp32 — from a
paged cache to a client that scatters it into its own paged cache, over TCP and over the /dev/shm
fast path, interleaved so machine noise hits both. RDMA/InfiniBand is not on a laptop: its column is
*modelled* from the hardware profiles' NIC numbers (`sim/hardware.py`, the simulator's
`kv_transfer_time`), and the report says so.

A further transport (NIXL, when it lands) joins by adding a `Transport` to `transports()`: anything
with a name that can pull one held request's KV and say how many bytes and which path it took.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.report import line_plot
from inferstack.lab.runtime import LabRun

if TYPE_CHECKING:
    from inferstack.engine.connector.transfer import KVLayout
    from inferstack.sim.models import ModelSpec

MODEL = "smollm2-135m"
MODELLED = ("h100", "a100", "l4")          # hardware profiles with a NIC line rate for KV transfer
QUICK_TOKENS = (16, 256, 2048)
FULL_TOKENS = (16, 128, 512, 2048, 8192)
BLOCK = 16


@dataclass(frozen=True)
class Transport:
    """A measured transport: ``pull(host, port, request_id, blocks, dst)`` moves one held request's KV
    into ``dst`` and returns (bytes moved, the path the transfer engine says it took)."""

    name: str
    pull: Callable[[str, int, str, list[int], list], tuple[int, str]]


def _transfer_engine(allow_shm: bool, layout: KVLayout) -> Transport:
    from inferstack.engine.connector.blocks import scatter_into_blocks
    from inferstack.engine.connector.transfer import KVTransferClient

    client = KVTransferClient(layout, allow_shm=allow_shm)

    def pull(host: str, port: int, rid: str, blocks: list[int], dst: list) -> tuple[int, str]:
        p = client.pull(host, port, rid)
        for chunk in p:
            scatter_into_blocks(dst, blocks[chunk.first_block:chunk.first_block + chunk.num_blocks], chunk.tensor)
        if not p.result.complete:
            raise RuntimeError(f"transfer {rid} incomplete")
        return p.result.bytes, p.result.transport

    return Transport("shm" if allow_shm else "tcp", pull)


def transports(layout: KVLayout) -> list[Transport]:
    """What this machine measures: TCP always, shared memory where /dev/shm exists."""
    return [_transfer_engine(False, layout), _transfer_engine(True, layout)]


def _measure(tokens: int, repeats: int, spec: ModelSpec) -> dict[str, list[float]]:
    """Seconds per transfer of ``tokens`` tokens, per transport, interleaved."""
    import torch

    from inferstack.engine.connector.transfer import KVTransferServer, PagedKVSource

    nblocks = max(1, tokens // BLOCK)
    caches = [torch.randn(2, nblocks + 4, BLOCK, spec.num_kv_heads, spec.head_dim) for _ in range(spec.num_layers)]
    dst = [torch.zeros_like(c) for c in caches]
    source = PagedKVSource(caches)
    server = KVTransferServer(source)
    host, port = server.address
    blocks = list(range(4, 4 + nblocks))
    secs: dict[str, list[float]] = {}
    try:
        ts = transports(source.layout)
        for r in range(-1, repeats):        # round -1 warms up each path (first connection, page faults)
            for t in ts:
                rid = f"{t.name}-{tokens}-{r}-{time.monotonic_ns()}"
                source.hold(rid, blocks)
                t0 = time.perf_counter()
                _, path = t.pull(host, port, rid, blocks, dst)
                if r >= 0:
                    secs.setdefault(path, []).append(time.perf_counter() - t0)
        if not all(torch.equal(a[:, 4:], b[:, 4:]) for a, b in zip(caches, dst, strict=True)):
            raise RuntimeError("received KV differs from what was sent")
    finally:
        server.close()
    return secs


def _modelled_ms(tokens: int) -> dict[str, float]:
    from inferstack.sim.hardware import get_hardware
    from inferstack.sim.models import get_model
    from inferstack.sim.perf_model import kv_transfer_time

    spec = get_model(MODEL)
    return {hw: kv_transfer_time(spec, get_hardware(hw), tokens) * 1000 for hw in MODELLED}


def run(lab: LabRun) -> LabResult:
    import torch

    from inferstack.sim.hardware import get_hardware
    from inferstack.sim.models import get_model

    torch.set_num_threads(1)
    spec = get_model(MODEL)
    sizes, repeats = (QUICK_TOKENS, 5) if lab.quick else (FULL_TOKENS, 15)
    rows, measured = [], {}
    for tokens in sizes:
        lab.step(f"transfer {tokens} tokens ({tokens * spec.kv_bytes_per_token / 1e6:.1f} MB) x {repeats} per path")
        secs = _measure(tokens, repeats, spec)
        measured[tokens] = {k: statistics.median(v) * 1000 for k, v in secs.items()}
        model = _modelled_ms(tokens)
        mb = tokens * spec.kv_bytes_per_token / 1e6
        rows.append([tokens, mb, measured[tokens].get("tcp"), measured[tokens].get("shm"),
                     *(model[h] for h in MODELLED)])
    nics = ", ".join(f"{h} {get_hardware(h).net_bandwidth * 8 / 1e9:.0f} Gb/s" for h in MODELLED)
    table = Table(f"Median ms per transfer ({repeats} each, interleaved); RDMA columns are modelled, not measured "
                  f"({nics} NIC line rate x {get_hardware('h100').net_efficiency:.0%} + fixed cost per transfer)",
                  ["tokens", "MB", "TCP (ms)", "shm (ms)", *(f"RDMA {h} modelled (ms)" for h in MODELLED)], rows)
    plots = _plots(lab, rows)
    setup = [f"KV of {MODEL} (fp32, {spec.num_layers} layers x {spec.num_kv_heads} KV heads x {spec.head_dim}: "
             f"{spec.kv_bytes_per_token / 1e3:.0f} kB per token), 16-token blocks, over 127.0.0.1 in one process",
             f"sizes {', '.join(map(str, sizes))} tokens, {repeats} transfers per size and path, TCP and shm "
             "interleaved; each transfer is pulled and scattered into a second paged cache, then compared",
             _nixl_line()]
    return LabResult(_findings(rows, spec.kv_bytes_per_token), [table], plots, {"rows": rows}, setup)


def _findings(rows: Sequence[list], bytes_per_token: float) -> list[str]:
    small, big = rows[0], rows[-1]
    out = []
    if big[2] and big[3]:
        out.append(f"At {big[0]} tokens ({big[1]:.0f} MB) TCP took {big[2]:.1f} ms ({big[1] / big[2]:.2f} GB/s) and "
                   f"shared memory {big[3]:.1f} ms ({big[1] / big[3]:.2f} GB/s): "
                   + (f"shm {big[2] / big[3]:.1f}x faster" if big[3] < big[2] else
                      f"TCP {big[3] / big[2]:.1f}x faster") + " on this machine.")
    if small[2] and small[3] and big[2]:
        scaled = small[1] / big[1] * big[2]        # what the small transfer would cost at the big one's GB/s
        what = ("the per-transfer cost (connection, request, framing) dominates, not bandwidth"
                if small[2] > 2 * scaled else "it costs about its size at the large transfers' rate")
        out.append(f"A {small[0]}-token transfer ({small[1] * 1000:.0f} kB) costs {small[2]:.2f} ms over TCP and "
                   f"{small[3]:.2f} ms over shm; at the large transfers' TCP rate it would take {scaled:.2f} ms, "
                   f"so at this size {what}.")
    if big[2]:
        h100 = big[4]
        than = f"{big[2] / h100:.0f}x less than" if h100 < big[2] else f"{h100 / big[2]:.1f}x more than"
        out.append(f"Modelled, not measured: the same {big[1]:.0f} MB over an H100's RDMA NIC would take "
                   f"{h100:.1f} ms, {than} loopback TCP here. Loopback TCP is a memory copy through the kernel; "
                   "between two machines TCP is bounded by the NIC too, plus its CPU cost.")
    per_4k = 4096 * bytes_per_token / 1e6
    out.append(f"Size grows with the prompt: a 4,096-token prompt is {per_4k:.0f} MB of KV for this model; "
               "models with more layers/KV heads move proportionally more per token.")
    return out


def _plots(lab: LabRun, rows: Sequence[list]) -> list:
    tokens = [r[0] for r in rows]
    gbps = {name: [r[1] / r[i] if r[i] else None for r in rows]
            for name, i in (("TCP (measured)", 2), ("shm (measured)", 3),
                            *((f"RDMA {h} (modelled)", 4 + j) for j, h in enumerate(MODELLED)))}
    modelled = tuple(n for n in gbps if "modelled" in n)
    return [
        line_plot(lab.out / "latency.png", "Time per KV transfer by size", "tokens of KV", "ms per transfer",
                  tokens, {n: [r[i] for r in rows] for n, i in zip(gbps, range(2, 2 + len(gbps)), strict=True)},
                  dashed=modelled),
        line_plot(lab.out / "throughput.png", "Effective throughput by size", "tokens of KV", "GB/s",
                  tokens, gbps, dashed=modelled),
    ]


def _nixl_line() -> str:
    if importlib.util.find_spec("nixl") is None:
        return "NIXL: not measured (the `nixl` package is not installed here)"
    return "NIXL: the `nixl` package is installed, but no NIXL transport is registered in this lab yet"


LAB = Lab(
    name="network", week=2, title="Network for KV transfer",
    question="How long does moving a request's KV between engines take, by size and transport, and how does "
             "that compare with RDMA?",
    teaches="TCP vs shared memory for KV transfer by size, with RDMA/InfiniBand modelled from hardware profiles",
    needs=("the KV transfer engine (engine/connector/transfer.py) over loopback",
           "hardware profiles (sim/hardware.py) for the modelled RDMA column"),
    minutes=1.0, run=run)
