"""Where the time of a NIXL transfer goes that is not copying: pulls of ``--blocks`` blocks between two
processes, timed phase by phase.

The prefill process is `kv_transfer.py`'s (a paged cache with a NIXL agent behind a transfer server);
this process is the decode engine and runs the steps of `NixlKVTransport.fetch` + `RemoteLoad.copy_into`
one at a time, with a clock between them (the same calls, in the same order, as `NixlKVTransport.read`
and `NixlAgent.read` make for a one-group READ):

- ``connect``: a new control connection (paid once per peer now that connections are kept; timed
  on its own, outside the total);
- ``ask``: NIXL_PULL sent on the kept connection → NIXL_OFFER's header back (the prefill side
  opens the hold, packs the offer);
- ``offer``: the offer's payload read and unpacked;
- ``check``: layout and block-hash checks, the peer's metadata looked up (loaded on the first pull);
- ``index``: the rows of the prepared descriptor lists the READ names (numpy; the lists themselves
  are prepared once per agent and peer), ``make``: `make_prepped_xfer` (NIXL merges rows adjacent on
  both sides), ``copy``: `transfer` polled until DONE (the bytes, plus the hand-off to the UCX copy
  threads when there are any: with ``--threads`` above 0 the pull is forced through them, which
  `NixlAgent.read` does only from ``BULK_MIN_BYTES`` on), ``release``: the handle freed;
- ``done→end``: DONE sent, END read (the prefill side's proof that it held the blocks).
Each as the median and the 90th percentile over ``--pulls`` pulls, after ``--warmup``; ``total`` is
the median of the per-pull sums, ``move`` the median of whole `fetch` + `copy_into` calls (what
`kv_transfer.py` reports: the READ in layer groups, as the engine makes it) on a kept connection,
``move CPU`` this process's CPU time for it (all threads: copy threads included), ``move, new conn``
the same with a new control connection each time (as before connections were kept), interleaved
with the others so that all see the same load; ``memcpy`` copies the same blocks of every layer, K
and V, between two tensors of this process (`Tensor.copy_`): what the bytes alone cost here.

    PYTHONPATH=src python benchmarks/kv_transfer_phases.py --threads 0,2 --blocks 1,5,22
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

import torch
from kv_transfer import BS, TRUST, block_hashes, move, prefill_process

from inferstack.engine.connector.nixl_agent import NixlAgent
from inferstack.engine.connector.nixl_transport import NixlKVTransport, RemoteLoad
from inferstack.engine.connector.transfer import KVLayout
from inferstack.engine.connector.transports import PullRequest
from inferstack.engine.connector.wire import Frame, FrameType, read_frame_header

PHASES = ("ask", "offer", "check", "index", "make", "copy", "release", "done→end")


def timed_pull(transport: NixlKVTransport, port: int, rid: str, n: int) -> dict[str, float]:
    clock = [time.perf_counter()]
    pull = PullRequest("127.0.0.1", port, rid, block_hashes(n), 0, n)
    conn, reply = transport._ask(pull)
    clock.append(time.perf_counter())
    offer = transport._offer(conn, reply)
    assert offer is not None, "the prefill process runs no NIXL agent"
    clock.append(time.perf_counter())
    load = transport._load(conn, f"127.0.0.1:{port}", offer, pull, transport.stats).load
    assert isinstance(load, RemoteLoad)
    load.accept(list(range(n)), n * BS, BS)
    clock.append(time.perf_counter())
    agent = transport.agent
    # the agent `NixlAgent.read` picks: the bulk one (copy threads) when bulk_min_bytes is 0
    endpoint = agent._bulk if agent._bulk is not None and agent.bulk_min_bytes == 0 else agent._direct
    with agent._lock:
        far = endpoint.remote_list(load.peer, load.regions)
    every = range(len(agent.regions.bases))
    ours, theirs = agent.regions.indices(every, load.block_ids), load.regions.indices(every, load.remote_ids)
    clock.append(time.perf_counter())
    nixl = endpoint.agent
    handle = nixl.make_prepped_xfer("READ", endpoint.local, ours, far, theirs)
    clock.append(time.perf_counter())
    state = nixl.transfer(handle)
    while state == "PROC":
        state = nixl.check_xfer_state(handle)
    assert state == "DONE", state
    clock.append(time.perf_counter())
    nixl.release_xfer_handle(handle)
    clock.append(time.perf_counter())
    conn.sendall(Frame(FrameType.DONE, "", num_blocks=n).pack_header())
    assert read_frame_header(conn).type == FrameType.END
    clock.append(time.perf_counter())
    transport.control.give_back("127.0.0.1", port, conn)
    return {name: (b - a) * 1e3 for name, a, b in zip(PHASES, clock[:-1], clock[1:], strict=True)}


def memcpy_ms(caches: list[torch.Tensor], sources: list[torch.Tensor], n: int) -> float:
    t0 = time.perf_counter()
    for cache, source in zip(caches, sources, strict=True):
        cache[:, :n].copy_(source[:, :n])
    return (time.perf_counter() - t0) * 1e3


def connect_ms(transport: NixlKVTransport, port: int) -> float:
    t0 = time.perf_counter()
    transport.control.connect("127.0.0.1", port).close()
    return (time.perf_counter() - t0) * 1e3


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="0,2",
                    help="UCX copy threads of the decode agent, one run each (above 0: the pull goes through them)")
    ap.add_argument("--blocks", default="1", help="blocks per pull (0.74 MB each), one row each: 5 = 4 MB, 22 = 16 MB")
    ap.add_argument("--pulls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(b) for b in args.blocks.split(",")]
    layers, shape = 30, (2, max(8, *sizes), BS, 3, 64)    # kv_transfer.py's SmolLM2-135M block: 0.74 MB
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(shape, layers, child), daemon=True)
    proc.start()
    port = parent.recv()
    caches = [torch.zeros(*shape) for _ in range(layers)]
    sources = [torch.randn(*shape) for _ in range(layers)]
    layout = KVLayout(layers, 3, 64, BS, torch.float32)
    print(f"one block = {layout.chunk_bytes(1) / 1e6:.2f} MB; ms, median / p90 over {args.pulls} pulls")
    print("| copy threads | blocks | connect | " + " | ".join(PHASES)
          + " | total | move | move CPU | move, new conn | memcpy |")
    print("|---|---|" + "---|" * (len(PHASES) + 6))
    for threads in map(int, args.threads.split(",")):
        transport = NixlKVTransport(NixlAgent("decode", caches, threads), layout, TRUST, None)  # type: ignore[arg-type]
        transport.agent.bulk_min_bytes = 0      # every pull through the copy threads, to time their hand-off
        for n in sizes:
            print(f"| {threads} | {n} | " + " | ".join(sample(transport, port, parent, caches, sources, n, args))
                  + " |", flush=True)
        transport.control.close()
        transport.agent.close()
    parent.send(None)
    proc.join(30)


def sample(transport: NixlKVTransport, port: int, parent: Connection, caches: list[torch.Tensor],
           sources: list[torch.Tensor], n: int, args: argparse.Namespace) -> list[str]:
    """One table row's cells: ``args.pulls`` pulls of ``n`` blocks, each way, interleaved."""
    rows: list[dict[str, float]] = []
    connects, moves, cpu, fresh, copies = [], [], [], [], []
    for i in range(args.warmup + args.pulls):
        parent.send((f"n{n}-{i}", n))
        rows.append(timed_pull(transport, port, parent.recv(), n))
        connects.append(connect_ms(transport, port))
        for kept, out in ((10.0, moves), (-1.0, fresh)):
            transport.control.max_idle_s = kept     # -1: every kept connection is too old to reuse
            parent.send((f"n{n}-move-{kept}-{i}", n))
            rid = parent.recv()
            c0 = time.process_time()
            out.append(move(transport, port, rid, n, caches) * 1e3)
            if out is moves:
                cpu.append((time.process_time() - c0) * 1e3)
        copies.append(memcpy_ms(caches, sources, n))
    skip = args.warmup
    columns = [connects[skip:], *([r[p] for r in rows[skip:]] for p in PHASES),
               [sum(r.values()) for r in rows[skip:]], moves[skip:], cpu[skip:], fresh[skip:], copies[skip:]]
    return [f"{statistics.median(v):.3f} / {p90(v):.3f}" for v in columns]


if __name__ == "__main__":
    main()
