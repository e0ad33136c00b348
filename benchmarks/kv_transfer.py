"""PD KV transfer between two processes on one host: TCP vs shared memory vs NIXL (UCX).

A prefill process holds a request's prompt KV in its paged cache (SmolLM2-135M shape by default:
30 layers, 3 KV heads, head_dim 64, fp32, 16-token blocks: 0.74 MB per block); this process is the
decode engine and moves the blocks into its own paged cache with each transport, through the
connector's own code (``KVTransport.fetch`` then ``PendingLoad.copy_into``): tcp and shm receive
chunks and scatter them into blocks, nixl READs straight into the blocks. Reported per size: the
median time and GB/s of the whole move (connect, hash checks, bytes, into the blocks), the CPU
time both processes spent on it (on a loaded host the wall time is mostly waiting for a core), and
the 1-block latency. NIXL READs straight from the prefill side's params once its agent is loaded (round 0, a
warm-up, asks for an offer), as the engine does; ``--nixl-paths direct,offer`` adds the offer-first path as
a column. Transports are interleaved so machine noise hits each alike; one size at a
time, so the shm segment pool (two free segments) holds that size's segment as it would in a steady stream.
In a fixed order every column's move follows the same other column's (NIXL's follows shm's: the twelfth stop
found each phase of a 16 MB NIXL move slower right after an shm move); ``--order abba`` reverses the order every
other round, so each column follows each other column (and itself) about equally often, and prints the times
split by the move just before. ``--copy-control`` also times an in-process copy of the same bytes each round
(huge pages, one thread): the machine's own copy speed in that run, against which NIXL's single-thread CMA copy
can be compared across runs (the fourteenth stop found both slow down together on this host).

    python benchmarks/kv_transfer.py --sizes-mb 4,16,64,256 --repeats 5
    python benchmarks/kv_transfer.py --sizes-mb 4,16 --repeats 30 --transports shm,nixl --order abba
    python benchmarks/kv_transfer.py --sizes-mb 4,16 --repeats 15 --transports shm,nixl --order abba --copy-control
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from inferstack.engine.connector.nixl_agent import BULK_MIN_BYTES, NixlAgent, NixlUnavailable, default_threads
from inferstack.engine.connector.nixl_transport import NixlExporter, NixlKVTransport
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import (
    KVLayout,
    KVTransferClient,
    KVTransferServer,
    PagedKVSource,
)
from inferstack.engine.connector.transports import DirectRead, KVTransport, PullRequest, TcpKVTransport
from inferstack.engine.kv.host_memory import huge_page_layers, huge_page_zeros

TRUST = TransferTrust(secret=b"benchmark")
BS = 16


def block_hashes(n: int) -> list[bytes]:
    return [i.to_bytes(32, "little") for i in range(n)]


def kv_caches(shape: tuple[int, ...], layers: int, huge: bool) -> list[torch.Tensor]:
    """Zeroed per-layer caches: on huge pages as the engine's CPU KV cache (``huge``), or torch's own memory."""
    return huge_page_layers(layers, shape, torch.float32) if huge else [torch.zeros(shape) for _ in range(layers)]


def prefill_process(shape: tuple[int, ...], layers: int, conn: Connection, huge: bool = True) -> None:
    """The prefill engine: holds ``n`` blocks per request id it is sent; answers with its port."""
    torch.set_num_threads(1)
    caches = [cache.normal_() for cache in kv_caches(shape, layers, huge)]
    source = PagedKVSource(caches, hold_s=600)
    try:
        exporter = NixlExporter(NixlAgent("prefill", caches), TRUST)
    except NixlUnavailable as exc:
        print(f"prefill: {exc}", file=sys.stderr)
        exporter = None
    server = KVTransferServer(source, nixl=exporter)
    conn.send(server.address[1])
    while (msg := conn.recv()) is not None:
        if msg == "cpu":              # this process's CPU seconds so far (its part of a transfer's cost)
            conn.send(time.process_time())
            continue
        rid, n = msg
        source.hold(rid, list(range(n)), block_hashes(n))
        agent = exporter.agent.name if exporter is not None else ""
        conn.send(DirectRead(agent, source.token(rid) or "", tuple(range(n)), block_hashes(n)[-1]))
    server.close()


def transports(layout: KVLayout, caches: list[torch.Tensor], names: list[str],
               nixl_threads: list[int], paths: list[str], bulk_mib: list[float]) -> dict[str, tuple[KVTransport, bool]]:
    """Columns: (transport, whether it READs straight from the params when it can)."""
    tcp = TcpKVTransport(KVTransferClient(layout, allow_shm=False))
    out: dict[str, tuple[KVTransport, bool]] = {
        "tcp": (tcp, False), "shm": (TcpKVTransport(KVTransferClient(layout, allow_shm=True)), False)}
    out = {name: way for name, way in out.items() if name in names}
    for threads in nixl_threads if "nixl" in names else ():
        for path in paths:
            for mib in bulk_mib:
                column = "nixl" if len(nixl_threads) == 1 else f"nixl-t{threads}"
                column += "" if path == "direct" else f"-{path}"
                column += "" if len(bulk_mib) == 1 else f"-b{mib:g}"
                try:
                    agent = NixlAgent("decode", caches, threads)
                except NixlUnavailable as exc:
                    print(f"no nixl column: {exc}")
                    continue
                agent.bulk_min_bytes = int(mib * (1 << 20))
                out[column] = (NixlKVTransport(agent, layout, TRUST, tcp), path == "direct")
    return out


def move(transport: KVTransport, port: int, rid: str, n: int, caches: list[torch.Tensor],
         direct: DirectRead | None) -> tuple[float, bool]:
    """Seconds of the move, and whether it was a direct READ."""
    t0 = time.perf_counter()
    fetched = transport.fetch(PullRequest("127.0.0.1", port, rid, block_hashes(n), 0, n, direct=direct))
    assert fetched.load is not None and not fetched.failed, f"{transport.name}: transfer failed"
    fetched.load.accept(list(range(n)), n * BS, BS)
    fetched.load.copy_into(caches, BS)
    return time.perf_counter() - t0, getattr(fetched.load, "claim", None) is not None


def copy_seconds(src: torch.Tensor, dst: torch.Tensor, nbytes: int) -> float:
    """Seconds of an in-process copy of ``nbytes`` (the machine's copy speed now, a control for the moves)."""
    t0 = time.perf_counter()
    dst[:nbytes].copy_(src[:nbytes])
    return time.perf_counter() - t0


def cpu_both(prefill: Connection) -> float:
    """CPU seconds of this process and the prefill process so far: on a loaded host a move's wall time
    is mostly the scheduler's, its CPU time is the work both sides did for it."""
    prefill.send("cpu")
    return time.process_time() + prefill.recv()


def print_after(after: dict[tuple[str, object, str], list[float]], sizes: dict[object, int], names: list[str],
                block_bytes: int) -> None:
    """Each column's median move time by the column whose move came just before it (ABBA order)."""
    print("\nBy the move just before (ms median, moves in brackets):")
    print("| size | " + " | ".join(f"{n} after {m}" for n in names for m in names) + " |")
    print("|---|" + "---:|" * len(names) ** 2)
    for label, n in sizes.items():
        cells = [f"{statistics.median(got) * 1e3:.2f} ({len(got)})" if (got := after.get((name, label, prev)))
                 else "–" for name in names for prev in names]
        size = label if isinstance(label, str) else f"{n * block_bytes / 1e6:.0f} MB"
        print(f"| {size} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="4,16,64,256", help="transfer sizes in MB (10^6 bytes)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transports", default="tcp,shm,nixl", help="columns, of tcp, shm, nixl")
    ap.add_argument("--nixl-threads", default=str(default_threads()),
                    help="copy threads of the reading (decode) agent's UCX backend, a comma-separated list "
                         "for one nixl column each (0: the thread that asks copies)")
    ap.add_argument("--nixl-paths", default="direct",
                    help="direct (READ straight from the params once the peer's agent is loaded: the engine's "
                         "path), offer (NIXL_PULL -> NIXL_OFFER before every READ), or both: a column each")
    ap.add_argument("--nixl-bulk-mib", default=f"{BULK_MIN_BYTES / (1 << 20):g}",
                    help="READs of this many MiB or more go to the agent with copy threads "
                         "(nixl_agent.BULK_MIN_BYTES); a comma-separated list for one nixl column each")
    ap.add_argument("--plain-pages", action="store_true",
                    help="both caches in torch's own memory (4 KiB pages) instead of huge pages, as before the "
                         "engine's CPU KV cache asked for them")
    ap.add_argument("--order", choices=("fixed", "abba"), default="fixed",
                    help="columns in the same order every round, or reversed every other round (ABBA)")
    ap.add_argument("--copy-control", action="store_true",
                    help="also time an in-process copy of each size's bytes every round (a control row)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    layout = KVLayout(args.layers, args.kv_heads, args.head_dim, BS, torch.float32)
    block_bytes = layout.chunk_bytes(1)
    sizes = {mb: max(1, round(mb * 1e6 / block_bytes)) for mb in map(float, args.sizes_mb.split(","))}
    sizes["1 block"] = 1
    top = max(sizes.values())
    shape = (2, top, BS, args.kv_heads, args.head_dim)
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(shape, args.layers, child,
                                                                         not args.plain_pages), daemon=True)
    proc.start()
    port = parent.recv()
    caches = kv_caches(shape, args.layers, not args.plain_pages)
    ways = transports(layout, caches, args.transports.split(","), [int(t) for t in args.nixl_threads.split(",")],
                      args.nixl_paths.split(","), [float(m) for m in args.nixl_bulk_mib.split(",")])
    times: dict[tuple[str, object], list[float]] = {}
    cpu: dict[tuple[str, object], list[float]] = {}
    after: dict[tuple[str, object, str], list[float]] = {}     # by the column whose move came just before
    before = ""
    copies = [huge_page_zeros((top * block_bytes,), torch.uint8) for _ in range(2)] if args.copy_control else []
    for label, n in sizes.items():
        for r in range(args.repeats + 1):           # round 0 warms connections, pools and metadata
            order = list(ways.items())
            for name, (transport, use_direct) in order[::-1] if args.order == "abba" and r % 2 else order:
                rid = f"{name}-{label}-{r}"
                parent.send((rid, n))
                direct = parent.recv()
                spent = cpu_both(parent)
                dt, was_direct = move(transport, port, rid, n, caches, direct if use_direct else None)
                assert was_direct == use_direct or r == 0, f"{name}: not the path its column names"
                if r > 0:
                    times.setdefault((name, label), []).append(dt)
                    cpu.setdefault((name, label), []).append(cpu_both(parent) - spent)
                    after.setdefault((name, label, before), []).append(dt)
                before = name
            if copies and r > 0:
                times.setdefault(("copy", label), []).append(copy_seconds(*copies, n * block_bytes))
    print(f"block = {block_bytes / 1e6:.2f} MB; medians over {args.repeats} moves, two processes, one host; "
          "CPU = both processes' CPU time for the move (all threads)")
    print("| size | " + " | ".join(f"{n} ms | {n} GB/s | {n} CPU ms" for n in ways) + " |")
    print("|---|" + "---|---|---|" * len(ways))
    for label, n in sizes.items():
        cells = []
        for name in ways:
            med = statistics.median(times[(name, label)])
            cells.append(f"{med * 1e3:.2f} | {n * block_bytes / med / 1e9:.2f} "
                         f"| {statistics.median(cpu[(name, label)]) * 1e3:.2f}")
        size = label if isinstance(label, str) else f"{n * block_bytes / 1e6:.0f} MB ({n} blocks)"
        print(f"| {size} | " + " | ".join(cells) + " |")
    if copies:
        cells = [f"{label if isinstance(label, str) else f'{label:g} MB'} "
                 f"{statistics.median(times[('copy', label)]) * 1e3:.2f}" for label in sizes]
        print("In-process copy of the same bytes (control), ms median: " + ", ".join(cells))
    if args.order == "abba":
        print_after(after, sizes, list(ways), block_bytes)
    parent.send(None)
    proc.join(30)
    for transport, _ in ways.values():
        transport.close()


if __name__ == "__main__":
    main()
