"""Where the fixed cost of a small NIXL transfer goes: one-block pulls between two processes, timed phase by phase.

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
- ``descs``: the descriptor arrays of the READ (numpy), ``dlists``: NIXL descriptor lists,
  ``post``: `initialize_xfer`, ``copy``: `transfer` polled until DONE (the bytes, plus the hand-off to
  the UCX copy threads when there are any: with ``--threads`` above 0 the block is forced through
  them, which `NixlAgent.read` does only from ``BULK_MIN_BYTES`` on), ``release``: the handle freed;
- ``done→end``: DONE sent, END read (the prefill side's proof that it held the blocks).
Each as the median and the 90th percentile over ``--pulls`` pulls, after ``--warmup``; ``total`` is
the median of the per-pull sums, ``move`` the median of whole `fetch` + `copy_into` calls for the
same block (what `kv_transfer.py` reports as the one-block latency) on a kept connection, and
``move, new conn`` the same with a new control connection each time (as before connections were
kept), interleaved with the others so that both see the same load. The row with copy threads and a
new connection is the one-block path before this benchmark was written; 0 threads on a kept
connection is today's.

    PYTHONPATH=src python benchmarks/kv_transfer_phases.py --threads 0,2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
from kv_transfer import BS, TRUST, block_hashes, move, prefill_process

from inferstack.engine.connector.nixl_agent import NixlAgent, block_runs
from inferstack.engine.connector.nixl_transport import NixlKVTransport, RemoteLoad
from inferstack.engine.connector.transfer import KVLayout
from inferstack.engine.connector.transports import PullRequest
from inferstack.engine.connector.wire import Frame, FrameType, read_frame_header

PHASES = ("ask", "offer", "check", "descs", "dlists", "post", "copy", "release", "done→end")


def timed_pull(transport: NixlKVTransport, port: int, rid: str) -> dict[str, float]:
    clock = [time.perf_counter()]
    pull = PullRequest("127.0.0.1", port, rid, block_hashes(1), 0, 1)
    conn, reply = transport._ask(pull)
    clock.append(time.perf_counter())
    offer = transport._offer(conn, reply)
    assert offer is not None, "the prefill process runs no NIXL agent"
    clock.append(time.perf_counter())
    load = transport._load(conn, f"127.0.0.1:{port}", offer, pull, transport.stats).load
    assert isinstance(load, RemoteLoad)
    load.accept([0], BS, BS)
    clock.append(time.perf_counter())
    agent = transport.agent
    # the agent `NixlAgent.read` picks: the bulk one (copy threads) when bulk_min_bytes is 0
    nixl = agent._bulk.agent if agent._bulk is not None and agent.bulk_min_bytes == 0 else agent._agent
    runs = block_runs(load.block_ids, load.remote_ids)
    local_rows, far_rows = agent.regions.descs(runs, 0), load.regions.descs(runs, 1)
    clock.append(time.perf_counter())
    local, far = nixl.get_xfer_descs(local_rows, "DRAM"), nixl.get_xfer_descs(far_rows, "DRAM")
    clock.append(time.perf_counter())
    handle = nixl.initialize_xfer("READ", local, far, load.peer)
    clock.append(time.perf_counter())
    state = nixl.transfer(handle)
    while state == "PROC":
        state = nixl.check_xfer_state(handle)
    assert state == "DONE", state
    clock.append(time.perf_counter())
    nixl.release_xfer_handle(handle)
    clock.append(time.perf_counter())
    conn.sendall(Frame(FrameType.DONE, "", num_blocks=1).pack_header())
    assert read_frame_header(conn).type == FrameType.END
    clock.append(time.perf_counter())
    transport.control.give_back("127.0.0.1", port, conn)
    return {name: (b - a) * 1e3 for name, a, b in zip(PHASES, clock[:-1], clock[1:], strict=True)}


def connect_ms(transport: NixlKVTransport, port: int) -> float:
    t0 = time.perf_counter()
    transport.control.connect("127.0.0.1", port).close()
    return (time.perf_counter() - t0) * 1e3


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="0,2",
                    help="UCX copy threads of the decode agent, one run each (above 0: the block goes through them)")
    ap.add_argument("--pulls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers, shape = 30, (2, 8, BS, 3, 64)          # kv_transfer.py's SmolLM2-135M block: 0.74 MB
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(shape, layers, child), daemon=True)
    proc.start()
    port = parent.recv()
    caches = [torch.zeros(*shape) for _ in range(layers)]
    layout = KVLayout(layers, 3, 64, BS, torch.float32)
    print(f"one block = {layout.chunk_bytes(1) / 1e6:.2f} MB; ms, median / p90 over {args.pulls} pulls")
    print("| copy threads | connect | " + " | ".join(PHASES) + " | total | move | move, new conn |")
    print("|---|" + "---|" * (len(PHASES) + 4))
    for threads in map(int, args.threads.split(",")):
        transport = NixlKVTransport(NixlAgent("decode", caches, threads), layout, TRUST, None)  # type: ignore[arg-type]
        transport.agent.bulk_min_bytes = 0      # one block through the copy threads, to time their hand-off
        rows: list[dict[str, float]] = []
        connects, moves, fresh = [], [], []
        for i in range(args.warmup + args.pulls):
            parent.send((f"t{threads}-{i}", 1))
            rows.append(timed_pull(transport, port, parent.recv()))
            connects.append(connect_ms(transport, port))
            for kept, out in ((10.0, moves), (-1.0, fresh)):
                transport.control.max_idle_s = kept     # -1: every kept connection is too old to reuse
                parent.send((f"t{threads}-move-{kept}-{i}", 1))
                out.append(move(transport, port, parent.recv(), 1, caches) * 1e3)
        rows, connects = rows[args.warmup:], connects[args.warmup:]
        moves, fresh = moves[args.warmup:], fresh[args.warmup:]
        columns = [connects, *([r[p] for r in rows] for p in PHASES)]
        cells = [f"{statistics.median(v):.3f} / {p90(v):.3f}" for v in columns]
        totals = [sum(r.values()) for r in rows]
        cells += [f"{statistics.median(v):.3f} / {p90(v):.3f}" for v in (totals, moves, fresh)]
        print(f"| {threads} | " + " | ".join(cells) + " |")
        transport.control.close()
        transport.agent.close()
    parent.send(None)
    proc.join(30)


if __name__ == "__main__":
    main()
