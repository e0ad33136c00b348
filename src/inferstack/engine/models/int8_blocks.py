"""Large steps on the file's own block codes: an int8 × int8 VNNI GEMM (``csrc/int8_blocks.cpp``).

The large-step copy ``int8blk``: the quantized weight's codes as unsigned bytes with one scale (and one
minimum) per 32 input columns, packed once at load into the kernel's layout (16 output columns × 4 input
columns per 64-byte vector). The activations are quantized at each call per row per 32 columns, so a
large step multiplies exactly the weights the small steps use (no second rounding, unlike ``int8_gemm``'s
per-channel copy), at 1 byte per weight where the fp32 copy holds 4.

* Q4_1 (:class:`Int4Weight`): ``w = code · scale + minimum``: codes 0..15 as they are;
* Q8_0 and our grouped int8 (:class:`Int8Weight`): ``w = q · scale (+ offset)``: ``u = q + 128`` and the
  kernel takes ``128 · sum(xq)`` per block off the integer dot product.

Groups of 64 or 128 repeat their scale over each 32. Runs where the CPU has AVX-512 VNNI and the
extension is built (:func:`available`); elsewhere the large-step copy stays fp32 (``quant_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from inferstack.engine.models.extension import load_extension
from inferstack.engine.weights.quantize import Int4Weight, QuantWeight

BLOCK = 32      # input columns per scale in the kernel
LANES = 16      # output columns per vector
_NO_MIN = torch.empty(0)


def available() -> ModuleType | None:
    """The extension when it is built and this CPU runs the kernel, else None."""
    ext = load_extension()
    return ext if ext is not None and ext.int8_blocks_supported() else None


def packable(w: QuantWeight) -> bool:
    k = w.shape[1]
    group = w.group if isinstance(w, Int4Weight) else w.group or k
    return k % BLOCK == 0 and group % BLOCK == 0


@dataclass
class Int8Blocks:
    codes: torch.Tensor             # uint8 [T, K / 4, 16, 4]: T = ceil(N / 16) vectors of 16 output columns
    scale: torch.Tensor             # float32 [T, K / 32, 16]
    minimum: torch.Tensor | None    # float32 [T, K / 32, 16], or None (symmetric)
    zero: int                       # 0 (codes 0..15) or 128 (signed codes + 128)
    out_features: int
    kernel: ModuleType

    @classmethod
    def pack(cls, w: QuantWeight, kernel: ModuleType) -> Int8Blocks:
        """The kernel's layout of ``w`` (``packable(w)`` must hold)."""
        if isinstance(w, Int4Weight):
            unsigned, zero, minimum = w.codes.to(torch.uint8), 0, w.minimum
            scale = w.scale
        else:
            unsigned, zero, minimum = (w.q.to(torch.int16) + 128).to(torch.uint8), 128, w.offset
            scale = w.scale if w.group else w.scale[:, None]
        n, k = unsigned.shape
        blocks = k // BLOCK
        tiles = -(-n // LANES)
        pad = tiles * LANES - n
        codes = torch.nn.functional.pad(unsigned, (0, 0, 0, pad)).view(tiles, LANES, k // 4, 4)
        return cls(codes.permute(0, 2, 1, 3).contiguous(), _per_block(scale, blocks, pad),
                   None if minimum is None else _per_block(minimum, blocks, pad), zero, n, kernel)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x [M, K]`` (any float dtype) → ``x · wᵀ [M, N]``."""
        minimum = _NO_MIN if self.minimum is None else self.minimum
        y = self.kernel.int8_blocks_matmul(x, self.codes, self.scale, minimum, self.zero, self.out_features)
        return y if out_dtype == torch.float32 else y.to(out_dtype)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` → ``[M]`` int64: ``matmul(x).argmax(dim=1)`` (the first maximum, NaN counted largest) without
        writing the ``[M, N]`` product: an LM head under greedy sampling reads its tokens and nothing else."""
        minimum = _NO_MIN if self.minimum is None else self.minimum
        return self.kernel.int8_blocks_argmax(x, self.codes, self.scale, minimum, self.zero, self.out_features)

    def fuses_silu_mul(self) -> bool:
        """Whether :meth:`silu_mul` runs: gate and up each a whole number of 16-column vectors."""
        return self.out_features % (2 * LANES) == 0

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """For a fused gate/up weight (gate the first half of the output columns): ``silu(x · gateᵀ) · (x · upᵀ)``
        ``[M, N / 2]`` float32 in one call (each register tile multiplies a gate and its up column vector and
        stores only the product: no ``[M, N]`` intermediate, no SiLU pass). Needs :meth:`fuses_silu_mul`."""
        minimum = _NO_MIN if self.minimum is None else self.minimum
        return self.kernel.int8_blocks_silu_mul(x, self.codes, self.scale, minimum, self.zero, self.out_features)

    def nbytes(self) -> int:
        extra = 0 if self.minimum is None else self.minimum.numel() * 4
        return self.codes.numel() + self.scale.numel() * 4 + extra

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 4


def _per_block(values: torch.Tensor, blocks: int, pad: int) -> torch.Tensor:
    """``[N, groups]`` float → ``[T, blocks, 16]``: each group's value repeated over its blocks of 32."""
    per_block = values.float().repeat_interleave(blocks // values.shape[1], dim=1)
    padded = torch.nn.functional.pad(per_block, (0, 0, 0, pad))
    return padded.view(-1, LANES, blocks).transpose(1, 2).contiguous()


def reference(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in torch: ``x`` rounded to int8 per row per 32 columns (scale ``max|x| / 127``,
    round half to even) times the dequantized weight."""
    xf = x.float()
    m, k = xf.shape
    blocks = xf.view(m, k // BLOCK, BLOCK)
    sx = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(sx > 0, 1 / sx, torch.zeros_like(sx))
    return (torch.round(blocks * inv).clamp_(-128, 127) * sx).view(m, k) @ w.dequantize().t()
