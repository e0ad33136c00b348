"""The int8 × int8 block kernel (csrc/int8_blocks.cpp, the large-step copy ``int8blk``) against its torch
reference: the dequantized weight times the activation rounded to int8 per row per 32 columns. Odd row and
column counts (a partial last vector of 16 columns, an odd number of vectors, a partial register tile of
rows, more rows than one L2 chunk), every weight format it packs."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from inferstack.engine.models.int8_blocks import Int8Blocks, reference
from inferstack.engine.weights.quantize import Int4Weight, Int8Weight, QuantWeight

pytestmark = pytest.mark.slow

FORMATS = ("q4_1", "q4_1 g64", "q8_0", "int8 min/max", "int8 per row")


@pytest.fixture(scope="module")
def kernel(ext: ModuleType) -> ModuleType:
    if not ext.int8_blocks_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    return ext


def _weight(fmt: str, n: int, k: int, gen: torch.Generator) -> QuantWeight:
    group = 64 if fmt.endswith("g64") else 32
    scale = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    if fmt.startswith("q4_1"):
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        return Int4Weight(codes, scale, -8 * scale + torch.randn(n, k // group, generator=gen) * 0.01, group)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    if fmt == "int8 per row":
        return Int8Weight(q, scale[:, 0])
    offset = torch.randn(n, k // group, generator=gen) * 0.05 if fmt == "int8 min/max" else None
    return Int8Weight(q, scale, group=group, offset=offset)


_SHAPES = [(1, 16, 32), (5, 40, 96), (67, 50, 128), (300, 24, 64), (64, 576, 576)]


@pytest.mark.parametrize(("fmt", "m", "n", "k"), [
    (fmt, m, n, k) for fmt in FORMATS for m, n, k in _SHAPES if not (fmt.endswith("g64") and k % 64)])  # groups fit K
def test_kernel_is_the_reference_product(kernel, fmt, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = _weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 4 + 0.5   # a mean: minimum term
    x[m // 2] = 0.0                                    # an all-zero row: scale 0, no division by zero
    blocks = Int8Blocks.pack(w, kernel)
    assert blocks.codes.dtype == torch.uint8 and blocks.nbytes() < 2 * n * k
    out = blocks.matmul(x)
    ref = reference(w, x)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # Integer dot products per block, float32 sums over blocks: float32 rounding only.
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    assert out[m // 2].abs().max() == 0
    # The rounding of x per 32 columns keeps the product within ~1 % of the float one.
    exact = x @ w.dequantize().t()
    assert (out - exact).norm() <= 0.02 * exact.norm()
    assert blocks.matmul(x.bfloat16(), torch.bfloat16).dtype == torch.bfloat16


def test_kernel_rejects_what_it_cannot_run(kernel):
    w = _weight("q4_1", 32, 64, torch.Generator().manual_seed(0))
    blocks = Int8Blocks.pack(w, kernel)
    with pytest.raises(RuntimeError, match=r"multiple of 32|codes"):
        kernel.int8_blocks_matmul(torch.randn(3, 48), blocks.codes, blocks.scale, blocks.minimum, 0, 32)
    with pytest.raises(RuntimeError, match="zero"):
        kernel.int8_blocks_matmul(torch.randn(3, 64), blocks.codes, blocks.scale, blocks.minimum, 0, 40)
