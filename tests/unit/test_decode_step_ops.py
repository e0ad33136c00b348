"""The batch-1 decode step's cheaper forms: each must compute what the form it replaced computed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.support.models_tiny import make_meta

from inferstack.engine.executor import attention
from inferstack.engine.executor.attention import paged_attention, plan_attention
from inferstack.engine.models.arch import ModelArch
from inferstack.engine.models.layers import RotaryEmbedding, rms_norm


def _arch(head_dim: int = 64) -> ModelArch:
    return ModelArch(num_layers=1, hidden_size=4 * head_dim, num_heads=4, num_kv_heads=2, head_dim=head_dim,
                     intermediate_size=64, vocab_size=32, max_position_embeddings=4096, architecture="LlamaForCausalLM",
                     rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6)


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


def test_rotary_narrows_once_to_attention_dtype_exactly_as_before():
    """q and k leave rotary in attention's dtype with one cast, equal bit for bit to rotating in the
    tables' dtype and casting q and k separately (what attention and the cache write did)."""
    rotary = RotaryEmbedding(_arch(), torch.float32, "cpu")
    positions = torch.tensor([0, 1, 17, 900, 4095])
    x = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rot = rotary.lookup(positions, torch.bfloat16)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    textbook = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    assert rot.apply(x).dtype == torch.bfloat16
    assert torch.equal(rot.apply(x), textbook.to(torch.bfloat16))
    assert torch.equal(rotary.lookup(positions, torch.float32).apply(xf), textbook)


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
