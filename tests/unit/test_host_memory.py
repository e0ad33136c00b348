"""The CPU KV cache's memory: zeroed, 2 MiB-aligned, on transparent huge pages where the kernel allows them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from inferstack.engine.builder import build_engine
from inferstack.engine.config import EngineConfig
from inferstack.engine.kv.host_memory import HUGE_PAGE, huge_page_zeros
from support.models_tiny import write_tiny_model

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_kib() -> int:
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text()).group(1))


def thp_advisable() -> bool:
    return THP.exists() and "[never]" not in THP.read_text()


def test_zeroed_aligned_contiguous_and_writable():
    cache = huge_page_zeros((2, 40, 16, 3, 64), torch.float16)
    assert cache.shape == (2, 40, 16, 3, 64) and cache.dtype == torch.float16 and cache.is_contiguous()
    assert cache.data_ptr() % HUGE_PAGE == 0
    assert not cache.any()
    cache[1, 39] = 2.5
    assert float(cache.sum()) == 2.5 * 16 * 3 * 64
    assert huge_page_zeros((0, 4), torch.float32).shape == (0, 4)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists() or not thp_advisable(),
                    reason="no transparent huge pages to ask for on this kernel")
def test_the_memory_is_on_huge_pages_from_the_start():
    before = anon_huge_kib()
    cache = huge_page_zeros((8 * HUGE_PAGE // 4,), torch.float32)     # 8 huge pages' worth, touched already
    # most of it (the kernel may split some)
    assert cache.numel() and anon_huge_kib() - before >= 4 * HUGE_PAGE // 1024


@pytest.mark.skipif(not thp_advisable(), reason="no transparent huge pages to ask for on this kernel")
def test_the_engines_cpu_kv_cache_asks_for_huge_pages(tmp_path):
    """The CPU executor's per-layer caches start on 2 MiB boundaries (torch's allocator aligns to 64 bytes)."""
    torch.set_num_threads(1)
    model = write_tiny_model(tmp_path / "llama", "llama")
    engine = build_engine(EngineConfig(model=str(model), device="cpu", dtype="float32", num_kv_blocks=64))
    caches = engine.core.executor.kv_caches
    assert caches and all(c.data_ptr() % HUGE_PAGE == 0 and not c.any() for c in caches)
