"""The int8 KV cache's one-pass write (models/csrc/kv_write.cpp) against the torch path it replaces
(``KVFormat.encode`` then ``index_copy_``): the same cache bytes, codes and scales, for float32, bf16 and fp16
activations, strided K/V views as the model passes them, scattered slots, rounding ties and all-zero rows."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from inferstack.engine.executor.attention import AttentionPlan, _write
from inferstack.engine.executor.kv_format import KVFormat
from inferstack.engine.llm import LLM
from inferstack.engine.models import extension

pytestmark = pytest.mark.slow

NKV, HD = 3, 64


def _torch_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    fmt = KVFormat("int8", x.dtype, x.shape[-1])
    return cache.clone().index_copy_(0, slots, fmt.encode(x))


def _variants() -> list[ModuleType]:
    """The normal build, and the one-ISA builds where they are already built (the portable clones)."""
    built = [extension.load_extension(isa) for isa in ("avx2", "baseline")]
    return [m for m in built if m is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_write_gives_the_torch_paths_bytes(ext: ModuleType, dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, 9 + 2 * NKV, HD, generator=gen) * torch.rand(tokens, 1, 1, generator=gen) * 8)
    qkv = qkv.to(dtype)
    k = qkv[:, 9:9 + NKV]                                 # strided views, as Attention.forward hands them over
    k[0, 0] = 0.0                                         # an all-zero row: the 1e-12 floor of the scale
    if tokens > 1:                                        # ties: scale 1 exactly, x / scale halfway between codes
        k[1, 1] = torch.arange(HD, dtype=torch.float32).sub(HD // 2).add(0.5).to(dtype)
        k[1, 1, 0] = 127.0
    slots = torch.randperm(4 * tokens, generator=gen)[:tokens]
    cache = torch.randint(0, 256, (4 * tokens, NKV * (HD + 4)), generator=gen, dtype=torch.uint8)
    want = _torch_write(cache, k, slots)
    for module in [ext, *_variants()]:
        got = cache.clone()
        module.kv_int8_write(k, got, slots)
        assert torch.equal(got, want)


def test_write_rejects_bad_inputs(ext: ModuleType):
    cache = torch.zeros(8, NKV * (HD + 4), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ext.kv_int8_write(torch.randn(2, NKV, HD), cache, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="kv_heads"):
        ext.kv_int8_write(torch.randn(2, NKV, HD + 4), cache, torch.tensor([0, 1]))


def test_the_attention_write_takes_it_for_int8_caches_only(ext: ModuleType):
    """``_write`` calls the writer for an int8 cache, and the torch path for any other (its encode, its bytes)."""
    calls = []
    plan = AttentionPlan(2, torch.tensor([3, 1]), None, None, None, 0, [],
                         kv_writer=lambda x, half, slots: calls.append(x.shape))
    x = torch.randn(2, NKV, HD)
    _write(torch.zeros(4, NKV * (HD + 4), dtype=torch.uint8), x, KVFormat("int8", torch.float32, HD), plan)
    half = torch.zeros(4, NKV * HD, dtype=torch.bfloat16)
    _write(half, x, KVFormat("bfloat16", torch.float32, HD), plan)
    assert calls == [(2, NKV, HD)] and torch.equal(half[3], x[0].reshape(-1).bfloat16())


def test_the_engine_writes_int8_rows_in_one_pass(ext: ModuleType):
    llm = LLM("smollm2-135m", quantization="gguf", num_threads=1, kv_cache_bytes=32 << 20, kv_cache_dtype="int8")
    assert llm.engine.core.executor.lm.model.kv_writer is not None
