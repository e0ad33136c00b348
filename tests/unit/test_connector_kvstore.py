"""KVStoreConnector inside the real scheduler / KV manager / block pool, with a paged toy model.

The toy executor writes K/V that depend on (token, position, layer) into the paged cache, and
samples each next token from *all* K/V it reads back through the block table. So a load into
the wrong blocks, a stale chunk or another tenant's chunk changes the output; equality with a
plain run proves the loaded KV is the KV recompute would have produced.
"""

from __future__ import annotations

import time

import pytest
import torch

from inferstack.engine.connector.kvstore_connector import KVStoreConnector
from inferstack.engine.executor.base import ExecutorOutput
from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.hashing import KVKeySpace, chunk_keys
from inferstack.engine.kv.manager import KVCacheManager
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from inferstack.kvstore import ChunkLayout, TieredKVStore
from inferstack.kvstore.codec import HEADER_SIZE
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier

SPACE = KVKeySpace("7" * 64, "float64")
BS, LAYERS, HEADS, DIM = 16, 2, 2, 4
LAYOUT = ChunkLayout(LAYERS, HEADS, DIM, torch.float64, tokens=256)


class PagedToyExecutor:
    def __init__(self, num_blocks: int = 128) -> None:
        self.num_kv_blocks, self.block_size = num_blocks, BS
        self.kv_caches = [torch.zeros(2, num_blocks, BS, HEADS, DIM, dtype=torch.float64) for _ in range(LAYERS)]
        self.computed_prompt_tokens = 0

    def execute(self, batch: SchedulerOutput) -> ExecutorOutput:
        out = ExecutorOutput()
        for seq in batch.seqs:
            toks = seq.request.all_token_ids
            for p in range(seq.start, seq.start + seq.num_new_tokens):
                b, o = seq.block_ids[p // BS], p % BS
                for layer, cache in enumerate(self.kv_caches):
                    v = float((toks[p] * 31 + p * 7 + layer) % 1009)
                    cache[0, b, o] = v
                    cache[1, b, o] = -2 * v
            end = seq.start + seq.num_new_tokens
            self.computed_prompt_tokens += max(0, min(end, seq.request.num_prompt_tokens) - seq.start)
            if seq.sample:
                ids = torch.tensor(seq.block_ids[: -(-end // BS)])
                weights = torch.arange(1, end + 1, dtype=torch.float64)
                acc = 0.0
                for cache in self.kv_caches:
                    kv = cache[:, ids].reshape(2, -1, HEADS, DIM)[:, :end, 0, 0]
                    acc += float((kv[0] * weights).sum() - (kv[1] * weights).sum())
                out.sampled[seq.request_id] = int(acc) % 997
        return out


class Engine:
    """Scheduler + KV manager + pool + connector, stepped the way EngineCore.step does."""

    def __init__(self, tiers=None, num_blocks: int = 128) -> None:
        """``tiers=None``: the plain colocated engine, no connector at all."""
        self.ex = PagedToyExecutor(num_blocks)
        self.store = self.connector = None
        if tiers is not None:
            self.store = TieredKVStore(tiers, LAYOUT, SPACE.root)
            self.connector = KVStoreConnector(self.store, block_size=BS)
            self.connector.register_kv_caches(self.ex.kv_caches)
        self.sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_model_len=4096),
                               KVCacheManager(BlockPool(num_blocks, BS, True), SPACE), self.connector)

    def generate(self, prompt: list[int], max_tokens: int = 6, salt: str | None = None, rid: str = "r") -> list[int]:
        request = Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                          time.monotonic(), cache_salt=salt)
        self.sched.add_request(request)
        while self.sched.has_unfinished():
            batch = self.sched.schedule()
            if self.connector is not None:
                self.connector.start_load_kv()
            result = self.ex.execute(batch)
            if self.connector is not None:
                for seq in batch.seqs:
                    self.sched.kv.update_block_hashes(seq.request)
                self.connector.save_kv(batch.seqs)
            self.sched.update_from_output(batch, result.sampled)
        self.last = request
        return request.output_token_ids

    def close(self) -> None:
        if self.store is not None:
            self.store.flush()
            self.store.close()


PROMPT = [(i * 13 + 5) % 500 for i in range(520)]      # 32 full blocks + 8 tokens: two full chunks


def baseline(prompt=PROMPT, **kw) -> list[int]:
    e = Engine()
    out = e.generate(prompt, **kw)
    assert e.ex.computed_prompt_tokens == len(prompt)
    return out


@pytest.fixture
def disk_path(tmp_path):
    return tmp_path / "kv"


def test_second_engine_loads_the_prefix_from_disk_and_outputs_match(disk_path):
    a = Engine([HostTier(1 << 30), DiskTier(disk_path, 1 << 30)])
    first = a.generate(PROMPT)
    a.close()
    assert a.connector.stats.saved_chunks == 2
    assert first == baseline()

    b = Engine([HostTier(1 << 30), DiskTier(disk_path, 1 << 30)])     # a fresh replica, cold device cache
    second = b.generate(PROMPT)
    assert second == first
    assert b.sched.counters.external_prefix_cache_hits == 512
    assert b.sched.counters.external_prefix_cache_queries == len(PROMPT)
    assert b.last.num_external_cached_tokens == 512 and b.last.num_cached_tokens == 512
    assert b.ex.computed_prompt_tokens == len(PROMPT) - 512 <= BS, "at most one block of the prompt computed"
    assert b.store.tiers[1].stats.hits == 2
    assert b.connector.stats.saved_chunks == 0, "chunks that came from the store are not written back"
    b.close()


def test_device_hit_plus_external_hit_compose(disk_path):
    a = Engine([DiskTier(disk_path, 1 << 30)])
    a.generate(PROMPT)
    a.close()
    b = Engine([DiskTier(disk_path, 1 << 30)])
    short = PROMPT[:300]                        # device cache then holds one chunk + 2 blocks
    assert b.generate(short, rid="s") == baseline(short)
    b.sched.kv.pool.reset_prefix_cache()
    b.generate(PROMPT[:280], rid="warm")        # device: blocks 0..16 cached again
    out = b.generate(PROMPT, rid="full")
    assert out == baseline()
    assert b.last.num_cached_tokens == 512
    b.close()


def test_partial_chunk_at_the_end_of_a_prompt_is_loaded_up_to_the_last_full_block(disk_path):
    prompt = PROMPT[:512]                       # exactly two chunks: the last token must be computed
    a = Engine([DiskTier(disk_path, 1 << 30)])
    a.generate(prompt)
    a.close()
    b = Engine([DiskTier(disk_path, 1 << 30)])
    assert b.generate(prompt) == baseline(prompt)
    assert b.last.num_external_cached_tokens == 512 - BS
    b.close()


def test_corrupt_disk_chunk_is_recomputed_never_a_wrong_output(disk_path):
    a = Engine([DiskTier(disk_path, 1 << 30)])
    a.generate(PROMPT)
    a.close()
    key = chunk_keys(SPACE.hashes(PROMPT))[1]
    disk = DiskTier(disk_path, 1 << 30)
    path = disk._path(key)
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 1234] ^= 0x01
    path.write_bytes(bytes(data))
    b = Engine([disk])
    assert b.generate(PROMPT) == baseline()
    assert b.last.num_external_cached_tokens == 256
    assert disk.stats.corrupt == 1 and b.connector.stats.load_failures == 1
    assert b.ex.computed_prompt_tokens == len(PROMPT) - 256
    b.close()


def test_tenants_with_different_salts_never_hit_each_others_chunks(disk_path):
    a = Engine([DiskTier(disk_path, 1 << 30)])
    a.generate(PROMPT, salt="tenant-a")
    a.close()
    b = Engine([DiskTier(disk_path, 1 << 30)])
    assert b.generate(PROMPT, salt="tenant-b") == baseline(salt="tenant-b")
    assert b.sched.counters.external_prefix_cache_hits == 0
    b.generate(PROMPT, salt="tenant-a", rid="again")
    assert b.last.num_external_cached_tokens == 512
    b.close()


def test_dead_redis_tier_falls_back_to_recompute():
    from support.procs import free_port

    b = Engine([RedisTier(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)])
    assert b.generate(PROMPT) == baseline()
    assert b.sched.counters.external_prefix_cache_hits == 0
    assert b.store.tiers[0].stats.errors >= 1
    b.close()


def test_long_generation_saves_output_chunks_for_the_next_turn(disk_path):
    a = Engine([DiskTier(disk_path, 1 << 30)])
    prompt = PROMPT[:250]
    out = a.generate(prompt, max_tokens=300)
    a.close()
    assert a.connector.stats.saved_chunks == 2     # tokens 0..511 of prompt + output
    b = Engine([DiskTier(disk_path, 1 << 30)])
    turn2 = [*prompt, *out, 1, 2, 3]
    assert b.generate(turn2) == baseline(turn2)
    assert b.last.num_external_cached_tokens == 512
    b.close()
