"""The batch-1 decode step's cheaper forms: each must compute what the form it replaced computed."""

from __future__ import annotations

import torch

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


