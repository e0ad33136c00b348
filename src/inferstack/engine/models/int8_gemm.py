"""Large steps on int8 × int8 GEMMs: weights with a scale per output channel, activations with a scale
per row computed at each call (dynamic, symmetric), products summed in int32 by ``torch._int_mm``.

On CPUs with AVX-512 VNNI but no AMX, torch's bf16 GEMM (oneDNN's ``avx512_core_bf16`` kernel) can be
slower than its fp32 one, and the int4/int8 weight-only kernels stream the weight once per few rows, so
a step of 64 or 2,048 rows had no fast kernel at all; ``_int_mm`` runs VNNI's 4-way int8 dot products
(docs/benchmarks.md, "64 × 128/128, ninth stop"). The weights come from the dense (dequantized)
projection, so they are one more rounding of what the quantized kernels hold, on a 255-step grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A row of zeros gets this scale instead of 0 (its codes are 0 either way; no division by zero).
_TINY = 1e-30


@dataclass
class Int8Gemm:
    weight_t: torch.Tensor    # int8 [K, N]: the transposed view of the [N, K] codes, the layout _int_mm wants
    scale: torch.Tensor       # float32 [N]: w ≈ code · scale, per output channel

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Gemm:
        """Symmetric per-output-channel int8 of a dense ``[N, K]`` weight (round to nearest)."""
        wf = w.float()
        scale = wf.abs().amax(dim=1).clamp_(min=_TINY).div_(127)
        codes = torch.div(wf, scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(codes.t(), scale)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``x [M, K]`` (any float dtype) → ``x · wᵀ [M, N]`` in ``out_dtype``. Each row is quantized with its
        own scale ``max|x| / 127`` (float32), so one large activation costs only its own row precision."""
        xf = x.float()
        row_scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=_TINY).div_(127)
        codes = torch.div(xf, row_scale).round_().to(torch.int8)
        # Convert, then scale in place: the mixed int32 × float32 multiply and a multiply that writes bf16
        # were each ~1.7x slower than these plain float32 passes ([2048, 3072], 1 thread).
        out = torch._int_mm(codes, self.weight_t).float().mul_(self.scale).mul_(row_scale)
        return out if out_dtype == torch.float32 else out.to(out_dtype)

    def nbytes(self) -> int:
        return self.weight_t.numel() + self.scale.numel() * 4
