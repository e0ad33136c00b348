"""Where the time of a NIXL transfer goes that is not copying: direct READs of ``--blocks`` blocks between
two processes (the engine's path for every pull after a peer's first), timed phase by phase.

The prefill process is `kv_transfer.py`'s (a paged cache with a NIXL agent behind a transfer server, holding
each request's blocks and answering with its signed `DirectRead`); this process is the decode engine and runs
the steps of `NixlKVTransport.fetch` + `RemoteLoad.copy_into` one at a time, with a clock between them (the
same calls, in the same order, as `NixlKVTransport.read` and `NixlAgent.read` make):

- ``direct``: `NixlKVTransport.fetch` (the params checked against the loaded peer, no round trip) and
  ``accept``;
- ``index``: the rows of the prepared descriptor lists for every layer (each READ names a slice of them);
- per READ of the engine's layer groups (`layer_groups`: 1 READ for 5 blocks, 3 for 22), summed:
  ``make`` `make_prepped_xfer`, ``copy`` `transfer`
  polled until DONE (the bytes; the hand-off to the UCX copy threads with ``--threads`` above 0, which
  forces every pull through them), ``release`` the handle freed;
- ``claim``: NIXL_CLAIM sent on a kept control connection, END back (the prefill side's proof that it
  held the blocks throughout the READ), the connection given back to the pool.

Each as the median and the 90th percentile over ``--pulls`` pulls, after ``--warmup``; ``total`` is the
median of the per-pull sums, ``move`` the median of whole `fetch` + `copy_into` calls (what
`kv_transfer.py` reports), ``move CPU`` this process's CPU time for it (all threads: copy threads
included), interleaved with the phased pulls so that both see the same load; ``cma`` one
`process_vm_readv` of the same blocks of every layer (K and V runs, the iovecs NIXL's merged descriptors
name) from the prefill process, and ``memcpy`` the same blocks copied between two tensors of this
process (`Tensor.copy_`): what the bytes alone cost here.

    PYTHONPATH=src python benchmarks/kv_transfer_phases.py --threads 0 --blocks 1,5,22
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import statistics
import threading
import time
from multiprocessing.connection import Connection

import torch
from kv_transfer import BS, TRUST, block_hashes, kv_caches, move, prefill_process

from inferstack.engine.connector.nixl_agent import KVRegions, NixlAgent, _Endpoint, layer_groups
from inferstack.engine.connector.nixl_transport import NixlKVTransport, RemoteLoad
from inferstack.engine.connector.transfer import KVLayout, KVTransferClient
from inferstack.engine.connector.transports import DirectRead, PullRequest, TcpKVTransport

PHASES = ("direct", "index", "make", "copy", "release", "claim")


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Spinner:
    """A Python thread counting loop iterations: how much of the GIL another thread leaves it (``--gil``)."""

    def __init__(self) -> None:
        self.count = 0
        self.during_copy = 0        # iterations counted while a READ was in `transfer` / polled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="gil-probe", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.count += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed_pull(transport: NixlKVTransport, port: int, rid: str, params: DirectRead, n: int,
               spinner: Spinner | None = None) -> dict[str, float]:
    took = dict.fromkeys(PHASES, 0.0)
    t0 = time.perf_counter()
    fetched = transport.fetch(PullRequest("127.0.0.1", port, rid, block_hashes(n), 0, n, direct=params))
    load = fetched.load
    assert isinstance(load, RemoteLoad) and load.claim is not None, "not a direct READ"
    load.accept(list(range(n)), n * BS, BS)
    took["direct"] = time.perf_counter() - t0
    agent = transport.agent
    endpoint = agent._endpoint(n * 2 * len(agent.regions.bases) * agent.regions.block_bytes)
    with agent._lock:
        far = endpoint.remote_list(load.peer, load.regions)
    every = range(len(agent.regions.bases))
    t0 = time.perf_counter()
    ours, theirs = agent.regions.indices(every, load.block_ids), load.regions.indices(every, load.remote_ids)
    took["index"] = time.perf_counter() - t0
    for group in layer_groups(len(every), n * 2 * agent.regions.block_bytes, agent.min_read_bytes,
                              agent.first_read_bytes):
        rows = slice(group.start * 2 * n, group.stop * 2 * n)
        took["make"] -= time.perf_counter()
        handle = endpoint.agent.make_prepped_xfer("READ", endpoint.local, ours[rows], far, theirs[rows])
        took["make"] += time.perf_counter()
        took["copy"] -= time.perf_counter()
        before = spinner.count if spinner is not None else 0
        _poll(endpoint, handle, endpoint is agent._bulk)
        took["copy"] += time.perf_counter()
        if spinner is not None:
            spinner.during_copy += spinner.count - before
        took["release"] -= time.perf_counter()
        endpoint.agent.release_xfer_handle(handle)
        took["release"] += time.perf_counter()
    t0 = time.perf_counter()
    conn = transport._claim(load, 0.0)
    transport.control.give_back(*load.address, conn)
    took["claim"] = time.perf_counter() - t0
    return {name: seconds * 1e3 for name, seconds in took.items()}


def _poll(endpoint: _Endpoint, handle: object, yield_core: bool) -> None:
    state = endpoint.agent.transfer(handle)
    while state == "PROC":
        if yield_core:
            time.sleep(20e-6)
        state = endpoint.agent.check_xfer_state(handle)
    assert state == "DONE", state


def cma_ms(pid: int, ours: KVRegions, theirs: KVRegions, n: int) -> float:
    """One `process_vm_readv` of blocks 0..n of every layer, K and V (one iovec each), from ``pid``."""
    run = n * ours.block_bytes
    local = [base + kv * ours.num_blocks * ours.block_bytes for base in ours.bases for kv in (0, 1)]
    remote = [base + kv * theirs.num_blocks * theirs.block_bytes for base in theirs.bases for kv in (0, 1)]
    lv = (_IOVec * len(local))(*(_IOVec(a, run) for a in local))
    rv = (_IOVec * len(remote))(*(_IOVec(a, run) for a in remote))
    libc = ctypes.CDLL(None, use_errno=True)
    t0 = time.perf_counter()
    done = libc.process_vm_readv(pid, lv, len(local), rv, len(remote), 0)
    took = (time.perf_counter() - t0) * 1e3
    assert done == run * len(local), f"process_vm_readv moved {done} bytes (errno {ctypes.get_errno()})"
    return took


def memcpy_ms(caches: list[torch.Tensor], sources: list[torch.Tensor], n: int) -> float:
    t0 = time.perf_counter()
    for cache, source in zip(caches, sources, strict=True):
        cache[:, :n].copy_(source[:, :n])
    return (time.perf_counter() - t0) * 1e3


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="0",
                    help="UCX copy threads of the decode agent, one run each (above 0: the pull goes through them)")
    ap.add_argument("--blocks", default="1,5,22",
                    help="blocks per pull (0.74 MB each), one row each: 5 = 4 MB, 22 = 16 MB")
    ap.add_argument("--pulls", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--plain-pages", action="store_true",
                    help="both caches in torch's own memory (4 KiB pages), not on huge pages as the engine's")
    ap.add_argument("--gil", action="store_true",
                    help="a Python thread spins beside the pulls: printed, its loop iterations per ms during the "
                         "READs' copies and during the rest (0 during the copies: the copy holds the GIL, and an "
                         "engine's forward pass beside it waits)")
    ap.add_argument("--after-shm", action="store_true",
                    help="an shm move of the same blocks before each NIXL pull, as kv_transfer.py's interleaved "
                         "columns do (it leaves both caches' lines where an shm move puts them)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(b) for b in args.blocks.split(",")]
    layers, shape = 30, (2, max(8, *sizes), BS, 3, 64)    # kv_transfer.py's SmolLM2-135M block: 0.74 MB
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(shape, layers, child, not args.plain_pages),
                                           daemon=True)
    proc.start()
    port = parent.recv()
    caches = kv_caches(shape, layers, not args.plain_pages)
    sources = [cache.normal_() for cache in kv_caches(shape, layers, not args.plain_pages)]
    layout = KVLayout(layers, 3, 64, BS, torch.float32)
    print(f"one block = {layout.chunk_bytes(1) / 1e6:.2f} MB; ms, median / p90 over {args.pulls} pulls")
    print("| copy threads | blocks | " + " | ".join(PHASES) + " | total | move | move CPU | cma | memcpy |")
    print("|---|---|" + "---|" * (len(PHASES) + 5))
    for threads in map(int, args.threads.split(",")):
        transport = NixlKVTransport(NixlAgent("decode", caches, threads), layout, TRUST, None)  # type: ignore[arg-type]
        transport.agent.bulk_min_bytes = 0 if threads > 0 else 1 << 62
        for n in sizes:
            parent.send((f"warm-{threads}-{n}", n))
            parent.recv()
            move(transport, port, f"warm-{threads}-{n}", n, caches, None)    # the offer: loads the peer
            print(f"| {threads} | {n} | " + " | ".join(sample(transport, port, parent, proc.pid, caches, sources, n,
                                                              args)) + " |", flush=True)
        transport.control.close()
        transport.agent.close()
    parent.send(None)
    proc.join(30)


def sample(transport: NixlKVTransport, port: int, parent: Connection, pid: int, caches: list[torch.Tensor],
           sources: list[torch.Tensor], n: int, args: argparse.Namespace) -> list[str]:
    """One table row's cells: ``args.pulls`` pulls of ``n`` blocks, each way, interleaved."""
    rows: list[dict[str, float]] = []
    moves, cpu, cma, copies = [], [], [], []
    theirs = next(iter(transport._regions.values()))[1]
    shm = TcpKVTransport(KVTransferClient(transport.layout, allow_shm=True)) if args.after_shm else None
    spinner = Spinner() if args.gil else None
    t_start = time.perf_counter()
    for i in range(args.warmup + args.pulls):
        if shm is not None:
            parent.send((f"n{n}-shm-{i}", n))
            parent.recv()
            move(shm, port, f"n{n}-shm-{i}", n, caches, None)
        parent.send((f"n{n}-{i}", n))
        rows.append(timed_pull(transport, port, f"n{n}-{i}", parent.recv(), n, spinner))
        if shm is not None:
            parent.send((f"n{n}-shm2-{i}", n))
            parent.recv()
            move(shm, port, f"n{n}-shm2-{i}", n, caches, None)
        parent.send((f"n{n}-move-{i}", n))
        params = parent.recv()
        c0 = time.process_time()
        dt, direct = move(transport, port, f"n{n}-move-{i}", n, caches, params)
        assert direct, "not a direct READ"
        moves.append(dt * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        cma.append(cma_ms(pid, transport.agent.regions, theirs, n))
        copies.append(memcpy_ms(caches, sources, n))
    if shm is not None:
        shm.close()
    if spinner is not None:
        spinner.stop()
        copy_ms = sum(r["copy"] for r in rows)
        rest_ms = (time.perf_counter() - t_start) * 1e3 - copy_ms
        print(f"--gil, {n} blocks: a Python thread beside ran {spinner.during_copy / copy_ms:.0f} iterations/ms during "
              f"the copies, {(spinner.count - spinner.during_copy) / rest_ms:.0f}/ms the rest of the time")
    skip = args.warmup
    columns = [*([r[p] for r in rows[skip:]] for p in PHASES), [sum(r.values()) for r in rows[skip:]],
               moves[skip:], cpu[skip:], cma[skip:], copies[skip:]]
    return [f"{statistics.median(v):.3f} / {p90(v):.3f}" for v in columns]


if __name__ == "__main__":
    main()
