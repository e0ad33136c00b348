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


@pytest.mark.parametrize("fmt", FORMATS)
# Intermediate sizes in multiples of 32, as the models' (SmolLM2: 1536): torch's own SiLU takes a scalar exp (glibc's,
# not SLEEF's) for a row's last columns past a multiple of 32 (its loop steps two vectors), 1 ulp apart at times.
@pytest.mark.parametrize(("m", "inter", "k"), [(2, 32, 64), (9, 64, 128), (67, 32, 64), (64, 1536, 576)])
def test_silu_mul_is_silu_of_gate_times_up(kernel, fmt, m, inter, k):
    """A fused gate/up weight: one call gives silu(gate) * up, as the MLP computed it from the plain product."""
    if fmt.endswith("g64") and k % 64:
        pytest.skip("groups of 64 need K a multiple of 64")
    gen = torch.Generator().manual_seed(m + inter + k)
    w = _weight(fmt, 2 * inter, k, gen)
    x = torch.randn(m, k, generator=gen) * 3
    x[m // 2] = 0.0
    blocks = Int8Blocks.pack(w, kernel)
    assert blocks.fuses_silu_mul()
    plain = blocks.matmul(x)
    want = torch.nn.functional.silu(plain[:, :inter]) * plain[:, inter:]
    got = blocks.silu_mul(x)
    assert got.shape == (m, inter) and got.dtype == torch.float32
    # Bit for bit: the products are the plain kernel's, SiLU is torch's own (its exp included). A 1-ulp
    # difference in SiLU moved the 384-position top-1 check between 0.92 and 0.96 (int8 codes flip and cascade).
    assert torch.equal(got, want)
    assert got[m // 2].abs().max() == 0


def test_silu_mul_tails(kernel):
    """silu(g) * u for |g| far beyond float32's exp range (exp overflowing to inf, underflowing to 0) as torch."""
    k, inter = 32, 32
    gate = torch.zeros(2 * inter, k)
    gate[:inter, 0] = torch.tensor([-1e4, -200.0, -104.0, -88.0, -87.0, -30.0, -17.0, -1.0, -0.5, -1e-3, -1e-30, 0.0,
                                    1e-30, 1e-3, 0.5, 1.0, 2.0, 5.0, 9.0, 16.0, 17.0, 30.0, 60.0, 87.0, 88.0, 88.7,
                                    89.0, 104.0, 200.0, 1e3, 1e4, 3e4])
    gate[inter:, 0] = 1.0
    w = Int8Weight((gate * 127 / gate.abs().amax(1, keepdim=True).clamp_min(1e-9)).round().to(torch.int8),
                   gate.abs().amax(1).clamp_min(1e-9) / 127)
    blocks = Int8Blocks.pack(w, kernel)
    x = torch.zeros(1, k)
    x[0, 0] = 1.0
    plain = blocks.matmul(x)
    want = torch.nn.functional.silu(plain[:, :inter]) * plain[:, inter:]
    assert torch.equal(blocks.silu_mul(x), want)


def test_silu_mul_rejects_an_odd_split(kernel):
    w = _weight("q4_1", 48, 64, torch.Generator().manual_seed(1))      # gate and up of 24: not whole vectors
    blocks = Int8Blocks.pack(w, kernel)
    assert not blocks.fuses_silu_mul()
    with pytest.raises(RuntimeError, match="2 I output columns"):
        blocks.silu_mul(torch.randn(2, 64))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("fmt", "m", "n", "k"), [
    (fmt, m, n, k) for fmt in FORMATS for m, n, k in [*_SHAPES, (64, 4000, 576)]
    if not (fmt.endswith("g64") and k % 64)])
def test_argmax_is_the_products_argmax(kernel, fmt, m, n, k, threads):
    """The fused argmax (an LM head under greedy sampling) picks torch's index on the plain product, whatever the
    thread count (the columns are cut into ranges per thread and merged)."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = _weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 4 + 0.5
    x[m // 2] = 0.0                                    # every product 0: a tie over the whole row, index 0
    blocks = Int8Blocks.pack(w, kernel)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = blocks.argmax(x)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.int64 and torch.equal(got, blocks.matmul(x).argmax(dim=1))
    assert got[m // 2] == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_ties_nan_and_inf(kernel, threads):
    """Equal maxima in different column ranges (the first wins), NaN columns (counted largest, the first wins),
    +inf columns: the same index as torch.argmax over the product."""
    n, k = 16 * 41, 64                                 # 41 vectors: ranges of pairs and a lone last vector
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-60, 60, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3
    for col in (601, 7, 300):                          # identical largest columns: 7 is the first of them
        q[col], scale[col] = 127, 0.05
    x = torch.rand(9, k, generator=gen) + 0.5          # positive: the all-127 columns are each row's largest
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = {}
        for name, cols, value in (("tie", (), 0.0), ("nan", (650, 70, 500), float("nan")),
                                  ("inf", (655, 200, 201), float("inf"))):
            s = scale.clone()
            s[list(cols)] = value
            blocks = Int8Blocks.pack(Int8Weight(q, s, group=32), kernel)
            got = blocks.argmax(x)
            assert torch.equal(got, blocks.matmul(x).argmax(dim=1)), name
            cases[name] = set(got.tolist())
    finally:
        torch.set_num_threads(before)
    assert cases == {"tie": {7}, "nan": {70}, "inf": {200}}


def test_argmax_rejects_what_it_cannot_run(kernel):
    blocks = Int8Blocks.pack(_weight("q8_0", 32, 64, torch.Generator().manual_seed(0)), kernel)
    with pytest.raises(RuntimeError, match="last column vector"):
        kernel.int8_blocks_argmax(torch.randn(3, 64), blocks.codes, blocks.scale, torch.empty(0), 128, 40)
