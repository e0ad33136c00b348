"""KVStoreConnector inside the real scheduler / KV manager / block pool, with the paged toy model
of ``support/kv_toy.py``: equality with a plain run proves the loaded KV is what recompute makes."""

from __future__ import annotations

import pytest

from inferstack.engine.connector.kvstore_connector import KVStoreConnector
from inferstack.engine.kv.hashing import chunk_keys
from inferstack.kvstore import TieredKVStore
from inferstack.kvstore.codec import HEADER_SIZE
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier
from support.kv_toy import BS, LAYOUT, PROMPT, SPACE, ToyEngine, baseline


class Engine(ToyEngine):
    def __init__(self, tiers, num_blocks: int = 128) -> None:
        self.store = TieredKVStore(tiers, LAYOUT, SPACE.root)
        super().__init__(KVStoreConnector(self.store, block_size=BS), num_blocks)

    def close(self) -> None:
        self.store.flush()
        self.store.close()


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


def test_tier_writes_and_evictions_become_kv_events_with_their_medium(disk_path):
    from inferstack.engine.kv.events import BlockRemoved, BlockStored
    from inferstack.engine.kv.hashing import BLOCK_SIZE

    chunk = LAYOUT.encoded_bytes
    a = Engine([HostTier(1 * chunk), DiskTier(disk_path, 10 * chunk)])
    a.generate(PROMPT)
    a.store.flush()
    events = a.connector.take_events()
    hashes = SPACE.hashes(PROMPT)
    stored = {(e.medium, e.block_hashes[-1]) for e in events if isinstance(e, BlockStored)}
    keys = chunk_keys(hashes)
    assert stored == {(m, k) for m in ("host", "disk") for k in keys}
    first = next(e for e in events if isinstance(e, BlockStored) and e.block_hashes[-1] == keys[1])
    assert first.block_hashes == hashes[16:32] and first.parent_block_hash == hashes[15]
    assert first.token_ids == PROMPT[256:512] and first.block_size == BLOCK_SIZE
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert [(e.medium, e.block_hashes) for e in removed] == [("host", hashes[0:16])], "host holds one chunk"
    assert a.connector.take_events() == []
    a.close()


def test_a_request_waiting_for_blocks_keeps_its_staged_prefix(disk_path):
    a = Engine([DiskTier(disk_path, 1 << 30)])
    a.generate(PROMPT)
    a.close()
    other = [(i * 7 + 3) % 400 for i in range(520)]
    b = Engine([DiskTier(disk_path, 1 << 30)], num_blocks=40)     # room for one request at a time
    first = b.submit(other, rid="first")
    second = b.submit(PROMPT, rid="second")
    b.run()
    assert first.output_token_ids == baseline(other)
    assert second.output_token_ids == baseline()
    assert second.num_external_cached_tokens == 512
    assert b.store.tiers[0].stats.hits == 2, "staged once, not re-read on every attempt"
    b.close()


def test_slow_tier_reads_happen_in_the_background_while_other_requests_run(disk_path):
    import threading

    a = Engine([DiskTier(disk_path, 1 << 30)])
    a.generate(PROMPT)
    a.close()
    gate = threading.Event()

    class SlowDisk(DiskTier):
        def get(self, key):
            gate.wait(10)          # a remote tier that takes its time
            return super().get(key)

    b = Engine([SlowDisk(disk_path, 1 << 30)])
    slow = b.submit(PROMPT, rid="slow")
    other = [(i * 7 + 3) % 400 for i in range(40)]
    fast = b.submit(other, rid="fast")
    batch = b.sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["fast"], "the request waiting for KV does not block others"
    b.sched.update_from_output(batch, b.ex.execute(batch).sampled)
    gate.set()
    b.run()
    assert slow.output_token_ids == baseline() and fast.output_token_ids == baseline(other)
    assert slow.num_external_cached_tokens == 512
    b.close()
