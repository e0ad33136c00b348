"""The CPU KV cache's memory: zeroed, 2 MiB-aligned, on transparent huge pages where the kernel allows them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from inferstack.engine.builder import build_engine
from inferstack.engine.config import EngineConfig
from inferstack.engine.kv.host_memory import HUGE_PAGE, huge_page_layers, huge_page_zeros
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


def test_layers_are_zeroed_contiguous_neighbours_in_one_aligned_area():
    shape = (2, 22, 16, 3, 64)
    layers = huge_page_layers(30, shape, torch.float32)
    nbytes = layers[0].numel() * 4
    assert len(layers) == 30 and layers[0].data_ptr() % HUGE_PAGE == 0
    assert all(c.shape == shape and c.is_contiguous() and not c.any() for c in layers)
    assert [c.data_ptr() - layers[0].data_ptr() for c in layers] == [i * nbytes for i in range(30)]
    layers[3][1, 21] = 1.5          # each layer its own memory
    assert float(layers[3].sum()) == 1.5 * 16 * 3 * 64 and not layers[2].any() and not layers[4].any()


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists() or not thp_advisable(),
                    reason="no transparent huge pages to ask for on this kernel")
def test_layers_smaller_than_a_huge_page_are_on_huge_pages():
    """30 layers of 540 KB (a 16 MB transfer's blocks of SmolLM2): one per mapping, none could be on a huge page."""
    before = anon_huge_kib()
    layers = huge_page_layers(30, (2, 22, 16, 3, 64), torch.float32)
    # most of the 16 MB's 7 whole huge pages (the kernel may split some)
    assert layers and anon_huge_kib() - before >= 4 * HUGE_PAGE // 1024


@pytest.mark.skipif(not thp_advisable(), reason="no transparent huge pages to ask for on this kernel")
def test_the_engines_cpu_kv_cache_asks_for_huge_pages(tmp_path):
    """The CPU executor's per-layer caches are neighbours in one area on a 2 MiB boundary (torch's allocator
    aligns to 64 bytes), so even a small cache's layers share huge pages."""
    torch.set_num_threads(1)
    model = write_tiny_model(tmp_path / "llama", "llama")
    engine = build_engine(EngineConfig(model=str(model), device="cpu", dtype="float32", num_kv_blocks=64))
    caches = engine.core.executor.kv_caches
    step = caches[0].numel() * caches[0].element_size()
    assert caches and caches[0].data_ptr() % HUGE_PAGE == 0 and not any(c.any() for c in caches)
    assert [c.data_ptr() - caches[0].data_ptr() for c in caches] == [i * step for i in range(len(caches))]
