"""The batch-1 decode step's cheaper forms: each must compute what the form it replaced computed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.support.models_tiny import make_meta

from inferstack.engine.executor import attention
from inferstack.engine.executor.attention import paged_attention, plan_attention
from inferstack.engine.models.layers import rms_norm


def test_norm_into_bf16_rounds_exactly_like_a_cast_and_keeps_its_input():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 96, generator=g) * 3, torch.rand(96, generator=g) + 0.5
    before = x.clone()
    reference = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(rms_norm(x, w, 1e-6), reference)                        # fp32: transformers' formula
    assert torch.equal(rms_norm(x, w, 1e-6, torch.bfloat16), reference.to(torch.bfloat16))
    assert torch.equal(x, before)                                                # the stream is not touched
    xb = x.to(torch.bfloat16)                                                    # bf16 input, fp32 weight
    assert rms_norm(xb, w, 1e-6).dtype == torch.float32


def test_small_decode_attends_on_one_thread_and_restores_the_count(monkeypatch):
    """A decode step with few context positions runs its attention with one thread (the SDPA region's
    wake-up cost more than the work) and gives the thread count back; the result is unchanged."""
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 4, 4, 2, 8, generator=g)
    q, k, v = torch.randn(1, 4, 8, generator=g), torch.randn(1, 2, 8, generator=g), torch.randn(1, 2, 8, generator=g)
    meta, _ = make_meta([([2, 0], 5, 1)], 4)
    counts: list[int] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        counts.append(torch.get_num_threads())
        return real_sdpa(*args, **kwargs)

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = paged_attention(q, k, v, cache.clone(), meta, 0.3)   # reference before patching
        assert plan_attention(meta).threads == 2
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        out = paged_attention(q, k, v, cache.clone(), meta, 0.3)
        assert counts == [1] and torch.get_num_threads() == 2
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        monkeypatch.setattr(attention, "SINGLE_THREAD_DECODE_POSITIONS", 4)   # 1 sequence x 8 positions
        paged_attention(q, k, v, cache.clone(), meta, 0.3)
        assert counts == [1, 2]
    finally:
        torch.set_num_threads(old)
