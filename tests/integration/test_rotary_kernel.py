"""The C++ rotary pass (csrc/rotary.cpp, used by ``Rotary.apply`` for float32 tables on CPU) gives torch's
form bit for bit: the same two rounded products and their rounded sum per element, on the strided q/k view
of a fused q/k/v projection as the attention layer passes it, for head sizes with and without a whole
vector per half, single rows and rows split over threads, infinities and NaN."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import pytest
import torch

from inferstack.engine.models.layers import Rotary, RotaryEmbedding

pytestmark = pytest.mark.slow


def _tables(t: int, head_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(t, head_dim // 2, generator=gen) * 1000
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


@pytest.mark.parametrize(("t", "heads", "head_dim", "threads"), [
    (1, 12, 64, 1), (3, 4, 32, 1), (64, 12, 64, 2), (2048, 12, 64, 2), (7, 3, 80, 1), (5, 2, 128, 2), (9, 1, 6, 1)])
def test_kernel_is_torchs_rotary_bit_for_bit(ext: ModuleType, t, heads, head_dim, threads):
    gen = torch.Generator().manual_seed(t * 100 + head_dim)
    qkv = torch.randn(t, heads + 3, head_dim, generator=gen) * 30
    qkv[0, 0, 0], qkv[-1, heads - 1, -1], qkv[t // 2, 0, head_dim // 2] = float("inf"), float("nan"), -0.0
    qk = qkv[:, :heads]                                # a strided view, as Attention.forward passes it
    cos, ssin = _tables(t, head_dim, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = Rotary(cos, ssin, ext.rotary_apply).apply(qk)
    finally:
        torch.set_num_threads(before)
    theirs = Rotary(cos, ssin).apply(qk)
    assert ours.shape == theirs.shape == (t, heads, head_dim) and ours.is_contiguous()
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))   # bits, NaN and -0 included


def test_other_dtypes_take_torchs_path(ext: ModuleType):
    gen = torch.Generator().manual_seed(1)
    cos, ssin = _tables(4, 64, gen)
    x = torch.randn(4, 2, 64, generator=gen).bfloat16()
    out = Rotary(cos, ssin, ext.rotary_apply).apply(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, Rotary(cos, ssin).apply(x))


@pytest.mark.parametrize(("dtype", "device", "takes"), [(torch.float32, "cpu", True), (torch.bfloat16, "cpu", False),
                                                     (torch.float32, "meta", False)])
def test_only_float32_cpu_tables_take_the_kernel(ext: ModuleType, dtype, device, takes):
    arch = SimpleNamespace(head_dim=64, rope_theta=10000.0, rope_freq_factors=None, rope_scaling=None,
                           max_position_embeddings=32)
    rot = RotaryEmbedding(arch, dtype, device).lookup(torch.tensor([0, 5, 31], device=device))  # type: ignore[arg-type]
    assert (rot.kernel is not None) == takes
