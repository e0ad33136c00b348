import os
import threading
from pathlib import Path

import pytest
import torch

from inferstack.engine.kv.hashing import KVKeySpace, chunk_keys
from inferstack.kvstore import ChunkLayout, KVStoreConfig, StoreEvent, TieredKVStore, parse_tiers
from inferstack.kvstore.codec import HEADER_SIZE
from inferstack.kvstore.config import build_store
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier
from inferstack.kvstore.tiers.base import Tier, Value
from inferstack.sizes import parse_size
from inferstack.telemetry.promtext import parse

SPACE = KVKeySpace("0" * 64, "float32")
LAYOUT = ChunkLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
CHUNK_BYTES = LAYOUT.encoded_bytes
TOKENS = list(range(10_000, 10_000 + 256 * 6))


def keys_for(tokens=TOKENS, salt=None):
    return chunk_keys(SPACE.hashes(tokens, cache_salt=salt))


def fill(store: TieredKVStore, key: bytes, seed: int) -> torch.Tensor:
    buf = store.new_buffer()
    buf.tensor.copy_(torch.randn(LAYOUT.shape, generator=torch.Generator().manual_seed(seed)))
    expected = buf.tensor.clone()
    assert store.put(key, buf)
    return expected


def chunk_file(disk: DiskTier, key: bytes) -> Path:
    return disk._path(key)


@pytest.fixture
def disk_dir(tmp_path):
    return tmp_path / "kv"


def test_lookup_is_the_longest_contiguous_prefix_across_tiers(disk_dir):
    host, disk = HostTier(10 * CHUNK_BYTES), DiskTier(disk_dir, 10 * CHUNK_BYTES)
    keys = keys_for()
    store = TieredKVStore([host, disk], LAYOUT, SPACE.root)
    payload = {i: fill(store, keys[i], i) for i in (0, 1, 2, 4)}   # chunk 3 is a gap
    store.flush()
    host.delete(keys[1])                      # chunk 1 only on disk now
    res = store.lookup(keys)
    assert res.num_chunks == 3 and res.tiers == ("host", "disk", "host")
    got = list(store.load(keys[: res.num_chunks]))
    assert len(got) == 3
    for i, chunk in enumerate(got):
        assert torch.equal(chunk, payload[i])
    store.flush()
    assert host.contains([keys[1]]) == [True], "a disk hit is promoted to host"
    assert store.lookup(keys[3:]).num_chunks == 0
    store.close()


def test_chunks_are_readable_while_still_queued_for_write_back():
    gate = threading.Event()

    class SlowHost(HostTier):
        def put(self, key: bytes, value: Value) -> bool:
            gate.wait(10)
            return super().put(key, value)

    store = TieredKVStore([SlowHost(10 * CHUNK_BYTES)], LAYOUT, SPACE.root)
    key = keys_for()[0]
    expected = fill(store, key, 7)
    assert store.lookup([key]).tiers == ("pending",)
    assert torch.equal(store.get(key), expected)
    gate.set()
    assert store.flush(10)
    assert store.lookup([key]).tiers == ("host",)
    store.close()


def test_full_write_back_queue_drops_and_counts_instead_of_blocking():
    gate = threading.Event()

    class BlockedHost(HostTier):
        def put(self, key: bytes, value: Value) -> bool:
            gate.wait(10)
            return super().put(key, value)

    store = TieredKVStore([BlockedHost(10 * CHUNK_BYTES)], LAYOUT, SPACE.root,
                          writeback_queue_bytes=2 * CHUNK_BYTES)
    keys = keys_for()
    accepted = [store.put(k, store.new_buffer()) for k in keys[:4]]
    assert accepted == [True, True, False, False]
    assert store.writeback.stats.dropped == 2
    gate.set()
    store.flush(10)
    assert store.lookup(keys).num_chunks == 2
    store.close()


def test_corrupt_disk_chunk_is_a_miss_deleted_and_counted(disk_dir):
    disk = DiskTier(disk_dir, 10 * CHUNK_BYTES)
    store = TieredKVStore([disk], LAYOUT, SPACE.root)
    keys = keys_for()
    fill(store, keys[0], 0)
    fill(store, keys[1], 1)
    store.flush()
    path = chunk_file(disk, keys[1])
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.lookup(keys).num_chunks == 2      # lookup is metadata only
    assert len(list(store.load(keys[:2]))) == 1    # the corrupt chunk ends the prefix
    assert disk.stats.corrupt == 1
    assert not path.exists()
    assert store.lookup(keys).num_chunks == 1
    store.close()


def test_corrupt_host_copy_falls_through_to_a_good_disk_copy(disk_dir):
    host, disk = HostTier(10 * CHUNK_BYTES), DiskTier(disk_dir, 10 * CHUNK_BYTES)
    store = TieredKVStore([host, disk], LAYOUT, SPACE.root)
    key = keys_for()[0]
    expected = fill(store, key, 3)
    store.flush()
    host.get(key)[HEADER_SIZE] ^= 0x01              # flip a bit in RAM
    assert torch.equal(store.get(key), expected)
    assert host.stats.corrupt == 1 and disk.stats.hits == 1
    store.close()


def test_truncated_file_from_a_crash_is_a_miss(disk_dir):
    disk = DiskTier(disk_dir, 10 * CHUNK_BYTES)
    store = TieredKVStore([disk], LAYOUT, SPACE.root)
    key = keys_for()[0]
    fill(store, key, 0)
    store.flush()
    path = chunk_file(disk, key)
    os.truncate(path, CHUNK_BYTES // 2)
    assert store.get(key) is None
    assert disk.stats.corrupt == 1 and not path.exists()
    store.close()


def test_disk_index_is_rebuilt_on_start_and_temp_files_are_removed(disk_dir):
    disk = DiskTier(disk_dir, 10 * CHUNK_BYTES)
    store = TieredKVStore([disk], LAYOUT, SPACE.root)
    keys = keys_for()
    expected = [fill(store, k, i) for i, k in enumerate(keys[:3])]
    store.close()
    leftover = disk_dir / "tmp" / "deadbeef.tmp"
    leftover.write_bytes(b"half a write")
    reopened = DiskTier(disk_dir, 10 * CHUNK_BYTES)
    assert not leftover.exists()
    assert reopened.used_bytes() == 3 * CHUNK_BYTES
    store2 = TieredKVStore([reopened], LAYOUT, SPACE.root)
    assert store2.lookup(keys).num_chunks == 3
    assert all(torch.equal(a, b) for a, b in zip(store2.load(keys[:3]), expected, strict=True))
    store2.close()


def test_disk_budget_evicts_least_recently_used_even_across_restarts(disk_dir):
    disk = DiskTier(disk_dir, 3 * CHUNK_BYTES)
    store = TieredKVStore([disk], LAYOUT, SPACE.root)
    events: list[StoreEvent] = []
    store.add_listener(events.append)
    keys = keys_for()
    for i, k in enumerate(keys[:3]):
        fill(store, k, i)
        store.flush()
    os.utime(chunk_file(disk, keys[0]), ns=(1, 1))          # make the order unambiguous on coarse clocks
    os.utime(chunk_file(disk, keys[1]), ns=(2, 2))
    os.utime(chunk_file(disk, keys[2]), ns=(3, 3))
    store.close()
    disk = DiskTier(disk_dir, 3 * CHUNK_BYTES)
    store = TieredKVStore([disk], LAYOUT, SPACE.root)
    store.add_listener(events.append)
    assert store.get(keys[0]) is not None                    # keys[0] becomes most recent
    fill(store, keys[3], 3)
    store.flush()
    assert disk.contains(keys[:4]) == [True, False, True, True]
    assert disk.used_bytes() <= 3 * CHUNK_BYTES
    assert StoreEvent("removed", "disk", (keys[1],)) in events
    assert StoreEvent("stored", "disk", (keys[3],)) in events
    store.close()


def test_host_tier_is_a_byte_bounded_lru():
    host = HostTier(2 * CHUNK_BYTES)
    store = TieredKVStore([host], LAYOUT, SPACE.root)
    keys = keys_for()
    fill(store, keys[0], 0)
    fill(store, keys[1], 1)
    store.flush()
    store.get(keys[0])
    fill(store, keys[2], 2)
    store.flush()
    assert host.contains(keys[:3]) == [True, False, True]
    assert host.used_bytes() == 2 * CHUNK_BYTES and host.stats.evictions == 1
    assert not host.put(b"x" * 32, bytearray(3 * CHUNK_BYTES)), "bigger than the whole tier"
    store.close()


def test_tenants_with_different_salts_never_share_chunks():
    store = TieredKVStore([HostTier(20 * CHUNK_BYTES)], LAYOUT, SPACE.root)
    a, b = keys_for(salt="tenant-a"), keys_for(salt="tenant-b")
    for i, k in enumerate(a):
        fill(store, k, i)
    store.flush()
    assert store.lookup(a).num_chunks == len(a)
    assert store.lookup(b).num_chunks == 0
    assert store.lookup(keys_for()).num_chunks == 0
    assert not set(a) & set(b)
    store.close()


def test_a_dead_redis_tier_fails_open():
    from support.procs import free_port

    dead = RedisTier(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    host = HostTier(10 * CHUNK_BYTES)
    store = TieredKVStore([host, dead], LAYOUT, SPACE.root)
    keys = keys_for()
    expected = fill(store, keys[0], 0)
    store.flush()
    assert store.lookup(keys).num_chunks == 1
    assert torch.equal(store.get(keys[0]), expected)
    assert store.get(keys[1]) is None
    assert dead.stats.errors == 1, "after one failure the tier is skipped for retry_after_s"
    assert not dead.available()
    dead.retry_after_s = 0.0
    dead._down_until = 0.0
    assert store.lookup(keys).num_chunks == 1 and dead.stats.errors == 2, "retried after the interval"
    store.close()


class ExplodingTier(Tier):
    name = "boom"
    medium = "remote"

    def contains(self, keys):
        raise OSError("tier down")

    def get(self, key):
        raise OSError("tier down")

    def put(self, key, value):
        raise OSError("tier down")

    def delete(self, key):
        raise OSError("tier down")


def test_tier_errors_never_escape_the_store():
    boom = ExplodingTier()
    store = TieredKVStore([boom], LAYOUT, SPACE.root)
    key = keys_for()[0]
    fill(store, key, 0)
    store.flush()
    assert store.lookup([key]).num_chunks == 0
    assert store.get(key) is None
    assert boom.stats.errors == 1 and not boom.available()
    store.close()


def test_config_parsing_names_what_is_wrong(tmp_path):
    assert parse_tiers("host, disk,redis") == ["host", "disk", "redis"]
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MB") == 512 * 10**6 and parse_size("1e6") == 10**6
    with pytest.raises(ValueError, match="unknown KV tier 'gpu'"):
        parse_tiers("gpu,host")
    with pytest.raises(ValueError, match="fastest first"):
        parse_tiers("disk,host")
    with pytest.raises(ValueError, match="not a byte size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="--kv-disk-path"):
        KVStoreConfig(tiers=["disk"])
    with pytest.raises(ValueError, match="--kv-redis-url"):
        KVStoreConfig(tiers=["redis"])
    cfg = KVStoreConfig(tiers="host,disk", host_bytes=4 * CHUNK_BYTES, disk_path=tmp_path, disk_bytes=8 * CHUNK_BYTES)
    store = build_store(cfg, LAYOUT, SPACE.root)
    assert [t.name for t in store.tiers] == ["host", "disk"]
    assert store.tiers[1].capacity_bytes() == 8 * CHUNK_BYTES
    store.close()


def test_collector_exposes_per_tier_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from inferstack.kvstore.metrics import KVStoreCollector

    store = TieredKVStore([HostTier(10 * CHUNK_BYTES)], LAYOUT, SPACE.root)
    keys = keys_for()
    fill(store, keys[0], 0)
    store.flush()
    store.get(keys[0])
    store.get(keys[1])
    registry = CollectorRegistry()
    registry.register(KVStoreCollector(store, "smollm2-135m"))
    scrape = parse(generate_latest(registry).decode(), t=0.0)
    host = (("model_name", "smollm2-135m"), ("tier", "host"))
    assert scrape.select("inferstack_kv_tier_hits_total") == {host: 1.0}
    assert scrape.select("inferstack_kv_tier_misses_total") == {host: 1.0}
    assert scrape.select("inferstack_kv_tier_write_bytes_total") == {host: float(CHUNK_BYTES)}
    assert scrape.select("inferstack_kv_tier_read_seconds_count") == {host: 1.0}
    # a sample with value 0, not just the HELP/TYPE lines prometheus_client prints for any family
    assert list(scrape.select("inferstack_kv_writeback_dropped_total").values()) == [0.0]
    store.close()


def test_inferstack_yaml_kv_section_becomes_engine_flags(tmp_path):
    import sys

    from inferstack.kvstore.settings import KVTierSettings
    from inferstack.stack.plan import engine_specs
    from inferstack.stack.settings import UpSettings

    up = UpSettings(replicas=2, kv={"tiers": ["host", "disk"], "host_bytes": "1GiB", "disk_path": str(tmp_path)})
    for spec in engine_specs(up, sys.executable):
        argv = list(spec.argv)
        assert argv[argv.index("--kv-tiers") + 1] == "host,disk"
        assert argv[argv.index("--kv-disk-path") + 1] == str(tmp_path), "replicas share one disk tier"
    # left out: the disk tier lives in the log directory, Redis is the server `up` starts
    defaults = UpSettings(replicas=2, kv={"tiers": "disk,redis"})
    assert defaults.kv is not None and defaults.kv.needs_redis_server
    for spec in engine_specs(defaults, sys.executable, log_dir="/logs", redis_url="redis://127.0.0.1:7/0"):
        argv = list(spec.argv)
        assert argv[argv.index("--kv-disk-path") + 1] == "/logs/kv-disk"
        assert argv[argv.index("--kv-redis-url") + 1] == "redis://127.0.0.1:7/0"
    assert not KVTierSettings(tiers="redis", redis_url="redis://h:1/0").needs_redis_server
    # one settings object, one set of defaults: yaml -> flags -> EngineConfig gives the yaml's store settings
    from inferstack.cli.engine import build_engine_config
    from inferstack.kvstore.settings import DEFAULT_HOST_BYTES

    yaml_store = KVTierSettings(tiers="host,disk").store_config("/logs/kv-disk")
    assert yaml_store.host_bytes == DEFAULT_HOST_BYTES == KVStoreConfig().host_bytes
    argv = yaml_store.engine_args()
    flags = {argv[i][2:].replace("-", "_"): argv[i + 1] for i in range(0, len(argv), 2)}
    assert build_engine_config("m", **flags).kv_store == yaml_store
    with pytest.raises(ValueError, match="needs redis_url"):
        KVTierSettings(tiers=["redis"]).store_config("/logs/kv-disk")
    with pytest.raises(ValueError, match="fastest first"):
        KVTierSettings(tiers="redis,host", redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="not a byte size"):
        KVTierSettings(tiers="host", host_bytes="lots")


def test_tier_metrics_behind_the_engine_render_cache_follow_every_store_change():
    """The engine's /metrics keeps the tiers' text while their `version()` is equal: a write, a hit, a miss
    (on the store's threads, the engine stats unchanged) each show at the next scrape."""
    from inferstack.engine.stats import EngineStats
    from inferstack.kvstore.metrics import KVStoreCollector
    from inferstack.telemetry.engine_metrics import EngineMetrics

    store = TieredKVStore([HostTier(10 * CHUNK_BYTES)], LAYOUT, SPACE.root)
    metrics = EngineMetrics()
    metrics.bind("m", EngineStats)
    metrics.add_live(KVStoreCollector(store, "m"))
    host = (("model_name", "m"), ("tier", "host"))

    def scrape(name: str) -> float:
        return parse(metrics.render()[0].decode(), t=0.0).select(name).get(host, 0.0)

    assert metrics.render()[0] == metrics.render()[0]
    keys = keys_for()
    fill(store, keys[0], 0)
    store.flush()
    assert scrape("inferstack_kv_tier_write_bytes_total") == float(CHUNK_BYTES)
    assert scrape("inferstack_kv_tier_used_bytes") == float(CHUNK_BYTES)
    store.get(keys[0])
    assert scrape("inferstack_kv_tier_hits_total") == 1.0
    assert scrape("inferstack_kv_tier_read_seconds_count") == 1.0
    store.get(keys[1])
    assert scrape("inferstack_kv_tier_misses_total") == 1.0
    store.close()
