"""The C++ one-pass RMSNorm (csrc/rms_norm.cpp, used by ``rms_norm`` for float32 rows) gives torch's composite
bit for bit: it replays torch's order of the row sum (four chains, the cascade's levels, the scalar tail, the
lanes folded left to right) for this CPU's vector width, so the int8 activation codes derived from the norm's
output, and every greedy token after them, stay the base's. Row lengths with and without whole vectors,
groups of four and cascade levels; one row to many rows over two threads; float32 and bf16 results."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from inferstack.engine.models.layers import norm_kernel, rms_norm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel(ext: ModuleType):
    k = norm_kernel(torch.device("cpu"))
    if k is None:
        pytest.fail("neither vector width reproduces torch's sum order on this CPU")
    return k


@pytest.mark.parametrize("n", [576, 64, 16, 100, 960, 2048, 4096, 8192, 17 * 16 * 4 * 16 + 40, 24])
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_kernel_is_torchs_norm_bit_for_bit(kernel, n, rows):
    gen = torch.Generator().manual_seed(rows * 10000 + n)
    x = torch.randn(rows, n, generator=gen) * torch.rand(rows, 1, generator=gen) * 50
    x[rows // 2, : n // 2] *= 1e4                     # a row whose magnitudes differ widely
    if rows > 2:
        x[1] = 0.0                                    # eps alone
    w = torch.randn(n, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for out_dtype in (None, torch.bfloat16):
            ours = rms_norm(x, w, 1e-5, out_dtype, kernel)
            theirs = rms_norm(x, w, 1e-5, out_dtype)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert torch.equal(ours, theirs), f"{(ours != theirs).sum().item()} of {ours.numel()} differ"
    finally:
        torch.set_num_threads(before)


def test_strided_rows_and_other_inputs(kernel):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 1200, generator=gen)
    x, w = wide[:, 100:676], torch.randn(576, generator=gen)       # rows with a stride of 1,200
    assert torch.equal(rms_norm(x, w, 1e-6, None, kernel), rms_norm(x, w, 1e-6))
    # bf16 rows, a missing weight, 3-D heads: torch's path, the same function's answer.
    for args in ((x.bfloat16(), w), (x, None), (x.reshape(5, 9, 64), torch.randn(64, generator=gen))):
        assert torch.equal(rms_norm(*args, 1e-6, None, kernel), rms_norm(*args, 1e-6))
