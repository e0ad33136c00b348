"""KV tiers against a real redis-server, and reuse across processes through shared tiers."""

import json
import subprocess
import sys
import time

import pytest
import redis
import torch

from inferstack.engine.kv.hashing import KVKeySpace, chunk_keys
from inferstack.kvstore import ChunkLayout, TieredKVStore
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier
from support.kv_redis import redis_server
from support.procs import inferstack_env

SPACE = KVKeySpace("ab" * 32, "float32")
LAYOUT = ChunkLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
TOKENS = list(range(500, 500 + 256 * 4 + 17))


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


def test_redis_tier_stores_binary_values_with_ttl(redis_url):
    tier = RedisTier(redis_url, ttl_s=120, prefix="t1:")
    keys = chunk_keys(SPACE.hashes(TOKENS))
    value = bytearray(bytes(range(256)) * 64)          # every byte value, incl. NUL and 0xFF
    assert tier.put(keys[0], value)
    assert tier.contains(keys) == [True, False, False, False]
    assert tier.get(keys[0]) == value
    ttl = redis.Redis.from_url(redis_url).ttl(b"t1:" + keys[0].hex().encode())
    assert 0 < ttl <= 120
    assert tier.get_many(keys[:2]) == [bytes(value), None]
    tier.delete(keys[0])
    assert tier.contains(keys[:1]) == [False]
    tier.close()


def test_redis_ttl_expires_chunks(redis_url):
    tier = RedisTier(redis_url, ttl_s=1, prefix="t2:")
    key = chunk_keys(SPACE.hashes(TOKENS))[0]
    tier.put(key, b"x" * 100)
    assert tier.contains([key]) == [True]
    deadline = time.monotonic() + 5
    while tier.contains([key]) == [True] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tier.contains([key]) == [False]
    tier.close()


def test_corrupt_redis_value_is_a_miss_and_is_deleted(redis_url):
    tier = RedisTier(redis_url, prefix="t3:")
    store = TieredKVStore([tier], LAYOUT, SPACE.root)
    key = chunk_keys(SPACE.hashes(TOKENS))[0]
    buf = store.new_buffer()
    buf.tensor.normal_()
    store.put(key, buf)
    store.flush()
    client = redis.Redis.from_url(redis_url)
    raw = bytearray(client.get(b"t3:" + key.hex().encode()))
    raw[-1] ^= 0x10
    client.set(b"t3:" + key.hex().encode(), bytes(raw))
    assert store.get(key) is None
    assert tier.stats.corrupt == 1 and tier.contains([key]) == [False]
    store.close()


WRITER = """
import json, sys, torch
from inferstack.engine.kv.hashing import KVKeySpace, chunk_keys
from inferstack.kvstore import ChunkLayout, TieredKVStore
from inferstack.kvstore.tiers import DiskTier, RedisTier
cfg = json.loads(sys.argv[1])
space = KVKeySpace("ab" * 32, "float32")
layout = ChunkLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
keys = chunk_keys(space.hashes(cfg["tokens"], cache_salt=cfg["salt"]))
store = TieredKVStore([DiskTier(cfg["disk"], 1 << 30), RedisTier(cfg["redis"], prefix="x:")], layout, space.root)
for i, key in enumerate(keys):
    buf = store.new_buffer()
    buf.tensor.copy_(torch.arange(buf.tensor.numel(), dtype=torch.float32).view(layout.shape) * (i + 1))
    store.put(key, buf)
assert store.flush(30)
store.close()
print(json.dumps([k.hex() for k in keys]))
"""


def test_a_chunk_written_by_one_process_is_found_by_another(redis_url, tmp_path):
    """Replica A computes and saves; replica B (this process) derives the same keys and reuses them."""
    cfg = {"tokens": TOKENS, "salt": "tenant-a", "disk": str(tmp_path / "disk"), "redis": redis_url}
    out = subprocess.run([sys.executable, "-c", WRITER, json.dumps(cfg)], env=inferstack_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    their_keys = json.loads(out.stdout.strip().splitlines()[-1])
    my_keys = chunk_keys(SPACE.hashes(TOKENS, cache_salt="tenant-a"))
    assert their_keys == [k.hex() for k in my_keys]
    assert len(my_keys) == 4

    for tiers in ([HostTier(1 << 30), RedisTier(redis_url, prefix="x:")],
                  [HostTier(1 << 30), DiskTier(tmp_path / "disk", 1 << 30)]):
        store = TieredKVStore(tiers, LAYOUT, SPACE.root)
        res = store.lookup(my_keys)
        assert res.num_chunks == 4 and res.tiers == (tiers[1].name,) * 4
        for i, chunk in enumerate(store.load(my_keys)):
            expected = torch.arange(chunk.numel(), dtype=torch.float32).view(LAYOUT.shape) * (i + 1)
            assert torch.equal(chunk, expected)
        store.flush()
        assert store.lookup(my_keys).tiers == ("host",) * 4, "remote hits are promoted to host RAM"
        other_tenant = chunk_keys(SPACE.hashes(TOKENS, cache_salt="tenant-b"))
        assert store.lookup(other_tenant).num_chunks == 0
        store.close()
