"""KV tiers: raw put/get throughput per tier, and TTFT of a reused prefix from each tier vs recompute.

Part 1 (no model): a 2,000-token prefix of SmolLM2-135M's KV (30 layers, 3 KV heads, head_dim 64,
fp32 → 7 full chunks of 11.8 MB) written through the store's write-back worker and read back
(verified) from each tier alone.
Part 2 (``--model``): the real engine on a 2,000-token prompt, max_tokens=1: TTFT when the prefix
is recomputed vs loaded from host RAM, local disk or Redis, with the hit path's breakdown
(lookup, fetch to host, copy into blocks, compute of the uncached tail).

Starts its own redis-server on a free loopback port (stopped by PID).

    python benchmarks/kv_tiers.py --model smollm2-135m --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from inferstack.engine.kv.hashing import KVKeySpace, chunk_keys
from inferstack.kvstore import ChunkLayout, KVStoreConfig, TieredKVStore
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def make_tiers(disk_dir: Path, redis_url: str) -> dict[str, object]:
    return {"host": HostTier(8 << 30), "disk": DiskTier(disk_dir, 8 << 30), "redis": RedisTier(redis_url)}


def raw_throughput(tiers: dict, tokens: int, repeats: int) -> None:
    layout = ChunkLayout(30, 3, 64, torch.float32)
    space = KVKeySpace("b" * 64, "float32")
    print(f"\n## raw tier throughput: {tokens}-token prefix, "
          f"{tokens // 256} chunks x {layout.encoded_bytes / 1e6:.1f} MB")
    for name, tier in tiers.items():
        store = TieredKVStore([tier], layout, space.root)
        w, r = [], []
        for rep in range(repeats):
            keys = chunk_keys(space.hashes(list(range(rep * 7919, rep * 7919 + tokens)), cache_salt=name))
            bufs = []
            for _ in keys:
                b = store.new_buffer()
                b.tensor.normal_()
                bufs.append(b)
            t0 = time.perf_counter()
            for k, b in zip(keys, bufs, strict=True):
                store.put(k, b)
            store.flush()
            w.append(len(keys) * layout.encoded_bytes / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            n = sum(1 for _ in store.load(keys))
            r.append(n * layout.encoded_bytes / (time.perf_counter() - t0) / 1e9)
            assert n == len(keys)
        print(f"{name:6s} write {statistics.median(w):.2f} GB/s   read+verify {statistics.median(r):.2f} GB/s"
              f"   (medians of {repeats})")
        store.writeback.close()


def ttft(model: str, tiers: dict, tokens: int, repeats: int, threads: int) -> None:
    from inferstack.engine.connector.kvstore_connector import KVStoreConnector
    from inferstack.engine.llm import LLM
    from inferstack.engine.sampling_params import SamplingParams

    llm = LLM(model, dtype="float32", num_threads=threads, kv_store=KVStoreConfig(tiers="host", host_bytes=1 << 30))
    core = llm.engine.core
    conn = core.scheduler.connector
    assert isinstance(conn, KVStoreConnector)
    layout, root = conn.store.layout, conn.store.root
    text = " ".join(f"Record {i}: the service wrote entry {i} to shard {i % 13} at step {i * 7}."
                    for i in range(tokens // 10))
    ids = llm.tokenizer.encode(text)[:tokens]
    params = SamplingParams(temperature=0, max_tokens=1)

    def run(store: TieredKVStore) -> tuple[float, list[int], dict[str, float]]:
        conn.store = store
        core.scheduler.kv.pool.reset_prefix_cache()
        s = conn.stats
        before = {k: getattr(s, k).total for k in ("lookup_seconds", "fetch_seconds", "load_seconds", "save_seconds")}
        t0 = time.perf_counter()
        out = llm.generate([ids], params)[0].outputs[0].token_ids
        dt = time.perf_counter() - t0
        parts = {k: getattr(s, k).total - before[k] for k in before}
        return dt, out, parts

    # Fill every tier once (the cold run also warms the model), then measure.
    all_tiers = TieredKVStore(list(tiers.values()), layout, root)
    run(all_tiers)
    all_tiers.flush()
    results: dict[str, list[tuple[float, dict[str, float]]]] = {}
    reference = None
    for _ in range(repeats):
        for name in ("recompute", *tiers):
            store = TieredKVStore([HostTier(1 << 30)] if name == "recompute" else [tiers[name]], layout, root)
            dt, out, parts = run(store)
            store.flush()
            store.writeback.close()
            reference = reference or out
            assert out == reference, f"{name} changed the output"
            results.setdefault(name, []).append((dt, parts))
    base = statistics.median(dt for dt, _ in results["recompute"])
    print(f"\n## TTFT, {len(ids)}-token prompt, max_tokens=1 ({repeats} runs each, medians; loaded prefix "
          f"{(len(ids) - 1) // 256 * 256} tokens)")
    print(f"{'path':10s} {'TTFT ms':>9s} {'speedup':>8s} {'lookup':>8s} {'fetch':>8s} {'load':>8s} {'save':>8s} "
          f"{'compute+rest':>13s}")
    for name, rs in results.items():
        dt = statistics.median(d for d, _ in rs)
        med = {k: statistics.median(p[k] for _, p in rs) * 1e3 for k in rs[0][1]}
        rest = dt * 1e3 - sum(med.values())
        print(f"{name:10s} {dt * 1e3:9.1f} {base / dt:7.1f}x {med['lookup_seconds']:8.2f} {med['fetch_seconds']:8.1f} "
              f"{med['load_seconds']:8.1f} {med['save_seconds']:8.1f} {rest:13.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="also measure TTFT with this model (e.g. smollm2-135m)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; keep 1 on a shared machine (2 threads on 2 busy cores stall on barriers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    proc, url = start_redis()
    tmp = Path(tempfile.mkdtemp(prefix="kv-bench-"))
    try:
        raw_throughput(make_tiers(tmp / "raw", url), args.tokens, args.repeats)
        if args.model:
            ttft(args.model, make_tiers(tmp / "ttft", url), args.tokens, args.repeats, args.threads)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
