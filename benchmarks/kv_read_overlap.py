"""A NIXL READ beside the decode engine's forward pass: what it costs the request, per way of running the READ.

`pd_transfer_share.py` finds the decode engine's TTFT ~5 % longer for a PD request than for the same
prompt with its KV local, while the connector's own clocks say 0.3 %: the forward pass runs slower while
the READ runs beside it. This benchmark isolates that in seconds instead of minutes: a prefill process
holds a prompt's blocks (`kv_transfer.py`'s), this process is the decode engine, and each round runs,
in rotating order,

- ``alone``: a forward pass with the KV local (no READ): the baseline;
- ``beside-tN``: the READ on a reader thread (as the connector's) started together with the forward pass
  on this thread, the READ through an agent with N UCX copy threads (0: the reader thread copies and
  polls without sleeping, the engine's path under ``BULK_MIN_BYTES``; above 0: the copy threads copy and
  the reader sleeps between polls, the engine's path for large READs). The request is ready when both
  ended (the engine's first token waits for the READ's end and its claim);
- ``defer-tN``: the READ first, then the forward pass (the engine deferring the request's forward pass
  until its READ ended).

The forward pass has SmolLM2-135M's shapes (30 layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536,
fp32, one torch thread as `pd_transfer_share.py`'s engines), random weights, over ``--new`` tokens
attending to ``--tokens`` cached ones (the decode leg of a PD request computes the last partial block
and its first token). It does not wait for layers to land (the READ of a 1,000-token prompt ends long
before the forward pass reaches its last layers). Printed per mode, medians over ``--rounds``: the
forward pass's wall time split into this thread's CPU time (the same CPU with a READ beside it means the
READ slows it by taking its core or the GIL, not by memory traffic), its time runnable but waiting for a
core (Linux ``schedstat``) and the rest, blocked (on the GIL: nixl's ``transfer()`` holds it for a READ's
copy); the READ's wall time, the request's ready time, and that minus the same round's ``alone`` as a
share of ``alone`` with a 95 % bootstrap interval of its median.

    PYTHONPATH=src python benchmarks/kv_read_overlap.py --threads 0,1,2 --rounds 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kv_transfer import BS, TRUST, kv_caches, move, prefill_process

from inferstack.engine.connector.nixl_agent import NixlAgent
from inferstack.engine.connector.nixl_transport import NixlKVTransport
from inferstack.engine.connector.transfer import KVLayout

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 30, 576, 9, 3, 64, 1536


@dataclass
class Model:
    """SmolLM2-135M-shaped layers with random weights (the cost of a forward pass, not its values)."""

    weights: list[list[torch.Tensor]]
    keys: torch.Tensor          # [KV_HEADS, tokens, HEAD_DIM], shared by every layer
    values: torch.Tensor

    @classmethod
    def make(cls, tokens: int) -> Model:
        shapes = [(HIDDEN, HEADS * HEAD_DIM), (HIDDEN, 2 * KV_HEADS * HEAD_DIM), (HEADS * HEAD_DIM, HIDDEN),
                  (HIDDEN, 2 * MLP), (MLP, HIDDEN)]
        weights = [[torch.randn(shape) * 0.02 for shape in shapes] for _ in range(LAYERS)]
        return cls(weights, torch.randn(KV_HEADS, tokens, HEAD_DIM), torch.randn(KV_HEADS, tokens, HEAD_DIM))

    def forward(self, new: int) -> tuple[float, float, float]:
        """Wall seconds of one forward pass over ``new`` tokens, this thread's CPU seconds for it and the
        seconds it waited on a run queue for a core (`schedstat`)."""
        t0, (c0, q0) = time.perf_counter(), schedstat()
        x = torch.randn(new, HIDDEN)
        group = HEADS // KV_HEADS
        keys, values = self.keys.repeat_interleave(group, 0), self.values.repeat_interleave(group, 0)
        for wq, wkv, wo, wup, wdown in self.weights:
            h = torch.nn.functional.rms_norm(x, (HIDDEN,))
            q = (h @ wq).view(new, HEADS, HEAD_DIM).transpose(0, 1)
            h @ wkv          # the new tokens' K and V (the cached ones stand for all of them)
            attn = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            x = x + attn.transpose(0, 1).reshape(new, -1) @ wo
            gate, up = (torch.nn.functional.rms_norm(x, (HIDDEN,)) @ wup).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ wdown
        c1, q1 = schedstat()
        return time.perf_counter() - t0, c1 - c0, q1 - q0


def schedstat() -> tuple[float, float]:
    """This thread's CPU seconds and seconds spent runnable on a run queue (Linux's schedstat). The rest of
    a span's wall time the thread was blocked: here, waiting for the GIL."""
    with open("/proc/thread-self/schedstat") as f:
        cpu_ns, queued_ns, _ = f.read().split()
    return int(cpu_ns) / 1e9, int(queued_ns) / 1e9


@dataclass
class Sample:
    forward: float
    forward_cpu: float
    queued: float        # the forward pass's thread runnable, waiting for a core
    read: float
    ready: float

    @property
    def blocked(self) -> float:
        """The forward pass's thread neither running nor runnable: waiting for the GIL."""
        return max(0.0, self.forward - self.forward_cpu - self.queued)


def run_mode(mode: str, model: Model, new: int, reads: dict[int, NixlKVTransport],
             hold: Callable[[], tuple]) -> Sample:
    if mode == "alone":
        wall, cpu, queued = model.forward(new)
        return Sample(wall, cpu, queued, 0.0, wall)
    way, threads = mode.split("-t")
    transport = reads[int(threads)]
    rid, n, params, port, caches = hold()
    t0 = time.perf_counter()
    if way == "defer":
        read = move(transport, port, rid, n, caches, params)[0]
        wall, cpu, queued = model.forward(new)
        return Sample(wall, cpu, queued, read, time.perf_counter() - t0)
    took: list[float] = []

    reader = threading.Thread(target=lambda: took.append(move(transport, port, rid, n, caches, params)[0]),
                              name="kv-read")
    reader.start()
    wall, cpu, queued = model.forward(new)
    reader.join()
    return Sample(wall, cpu, queued, took[0], time.perf_counter() - t0)


def share_interval(diffs: list[float], rng: random.Random) -> tuple[float, float]:
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    return meds[50], meds[1949]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1000, help="the prompt's tokens: its full blocks are READ")
    ap.add_argument("--new", type=int, default=16, help="tokens the decode leg's forward pass computes")
    ap.add_argument("--threads", default="0,1,2", help="UCX copy threads of the reading agent, one mode pair each")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.tokens // BS
    shape = (2, n, BS, KV_HEADS, HEAD_DIM)
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(shape, LAYERS, child), daemon=True)
    proc.start()
    port = parent.recv()
    caches = kv_caches(shape, LAYERS, True)
    layout = KVLayout(LAYERS, KV_HEADS, HEAD_DIM, BS, torch.float32)
    reads: dict[int, NixlKVTransport] = {}
    counter = iter(range(1 << 30))

    def hold() -> tuple:
        rid = f"r{next(counter)}"
        parent.send((rid, n))
        return rid, n, parent.recv(), port, caches

    for threads in map(int, args.threads.split(",")):
        agent = NixlAgent("decode", caches, threads)
        agent.bulk_min_bytes = 0 if threads > 0 else 1 << 62     # every READ through the copy threads, or none
        reads[threads] = NixlKVTransport(agent, layout, TRUST, None)  # type: ignore[arg-type]
        rid, _, _, _, _ = hold()
        move(reads[threads], port, rid, n, caches, None)   # the offer: loads the peer, connects UCX
    model = Model.make(args.tokens)
    modes = ["alone"]
    for threads in reads:
        modes += [f"beside-t{threads}", f"defer-t{threads}"]
    samples: dict[str, list[Sample]] = {mode: [] for mode in modes}
    for r in range(args.warmup + args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            sample = run_mode(mode, model, args.new, reads, hold)
            if r >= args.warmup:
                samples[mode].append(sample)
    report(samples, args, n * layout.chunk_bytes(1))
    parent.send(None)
    proc.join(30)
    for transport in reads.values():
        transport.control.close()
        transport.agent.close()


def report(samples: dict[str, list[Sample]], args: argparse.Namespace, nbytes: int) -> None:
    rng = random.Random(0)
    alone = [s.ready for s in samples["alone"]]
    print(f"READ {nbytes / 1e6:.1f} MB ({args.tokens} tokens); forward pass over {args.new} new tokens; "
          f"medians over {args.rounds} rounds, ms")
    print("| mode | forward | its CPU | waited for a core | blocked (GIL) | READ | ready "
          "| ready - alone (% of alone, 95 % CI) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(alone)
    for mode, rows in samples.items():
        diffs = [(s.ready - a) / base * 100 for s, a in zip(rows, alone, strict=True)]
        lo, hi = share_interval(diffs, rng) if mode != "alone" else (0.0, 0.0)
        print(f"| {mode} | {statistics.median(s.forward for s in rows) * 1e3:.1f} "
              f"| {statistics.median(s.forward_cpu for s in rows) * 1e3:.1f} "
              f"| {statistics.median(s.queued for s in rows) * 1e3:.1f} "
              f"| {statistics.median(s.blocked for s in rows) * 1e3:.1f} "
              f"| {statistics.median(s.read for s in rows) * 1e3:.2f} "
              f"| {statistics.median(s.ready for s in rows) * 1e3:.1f} "
              f"| {statistics.median(diffs):+.1f} % [{lo:+.1f}, {hi:+.1f}] |")


if __name__ == "__main__":
    main()
