"""Building blocks shared by the model families: the projection, rotary embedding and the fused
gated MLP.

RMSNorm is transformers' formula written out (:func:`rms_norm`); the rotary cache is precomputed
once and indexed by position so a step does no trigonometry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inferstack.engine.models.arch import ModelArch, ModelLoadError
from inferstack.engine.models.extension import load_extension
from inferstack.engine.models.quant_linear import QuantizedLinear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over ``[rows, in]``, with 2-3 fp32 rows on CPU padded to 4.

    torch's CPU fp32 GEMM streams the weight once per row for 2-3 rows and switches to its blocked
    kernel at 4 (SmolLM2's 576x3072 weight, cache-cold: 0.62 / 1.14 / 1.38 / 0.82 ms for 1-4 rows;
    the 49152-row LM head 9.9 / 22.4 / 33.4 / 18.5 ms). Decode steps of 2-3 sequences, the common
    case of interactive serving, were slower than steps of 4 (94 / 134 ms vs 82 ms). Zero rows
    never mix with the real ones, and bf16 has no such cliff."""
    rows = x.shape[0]
    if rows in (2, 3) and x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu":
        return F.linear(torch.cat((x, x.new_zeros(4 - rows, x.shape[1]))), weight, bias)[:rows]
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class NormKernel:
    """The extension's ``rms_norm_rows`` with torch's float32 vector width on this CPU (:func:`norm_kernel`)."""

    rows: Callable[[torch.Tensor, torch.Tensor, float, int, bool], torch.Tensor]
    lanes: int

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float, bf16_out: bool) -> torch.Tensor:
        return self.rows(x, weight, eps, self.lanes, bf16_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             out_dtype: torch.dtype | None = None, kernel: NormKernel | None = None) -> torch.Tensor:
    """RMSNorm in float32, op for op as transformers' ``LlamaRMSNorm``. ``F.rms_norm`` on CPU runs the
    same pow/mean/rsqrt/mul composite plus two copies and a ``type_as`` per call (torch 2.13): 61
    norms per SmolLM2 step made 122 of the step's 485 copies (docs/benchmarks.md, issue 14 third pass).

    ``out_dtype`` (a float32 input only) writes the weighted result straight into that dtype: the bf16
    input of a quantized projection without a separate cast, rounded exactly as ``(w * h).to(dtype)``.
    The statistics are updated in place (same values, two allocations fewer per call).

    ``kernel`` (:func:`norm_kernel`): the extension's one-pass norm, the same bits (it replays torch's sum
    order), used for float32 rows with a float32 weight and a float32 or bf16 result."""
    if kernel is not None and x.dim() == 2 and x.dtype == torch.float32 and x.stride(-1) == 1 \
            and weight is not None and weight.dtype == torch.float32 and out_dtype in (None, torch.float32,
                                                                                      torch.bfloat16):
        return kernel(x, weight, eps, out_dtype == torch.bfloat16)
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.float()
    h = h * h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    if dtype != torch.float32:
        h = h.to(dtype)
    if weight is None:
        return h if out_dtype is None else h.to(out_dtype)
    if out_dtype is not None and out_dtype != h.dtype:
        return torch.mul(h, weight, out=torch.empty(h.shape, dtype=out_dtype, device=h.device))
    return h.mul_(weight) if weight.dtype == h.dtype else weight * h


def norm_kernel(device: torch.device) -> NormKernel | None:
    """The extension's ``rms_norm_rows`` for float32 norms on CPU, with the vector width whose sum order gives
    torch's bits here. Torch's sum kernel may add 8-float vectors on an AVX-512 CPU (its default dispatch did
    on this Xeon), so the width is found by comparing both on rows of widely spread values; None when neither
    matches (another torch, another order), and the norms stay torch's."""
    ext = load_extension() if device.type == "cpu" else None
    if ext is None:
        return None
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(8, n, generator=gen) * torch.logspace(-3, 4, n) for n in (576, 1000, 4096)]
    for lanes in (8, 16):
        kernel = NormKernel(ext.rms_norm_rows, lanes)
        if all(torch.equal(kernel(x, x[0], 1e-5, False), rms_norm(x, x[0], 1e-5)) for x in rows):
            return kernel
    return None


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies with the model's scaling applied, in float32 (as transformers computes them)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if arch.rope_freq_factors is not None:
        factors = torch.tensor(arch.rope_freq_factors, dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ModelLoadError(f"rope frequency factors have {factors.numel()} entries, expected "
                                   f"{inv_freq.numel()} (head_dim / 2)")
        inv_freq = inv_freq / factors
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class Rotary:
    """One step's rotary tables, built once and applied by every layer (:meth:`RotaryEmbedding.lookup`)."""

    cos: torch.Tensor                  # [T, 1, head_dim]: cos | cos
    signed_sin: torch.Tensor           # [T, 1, head_dim]: -sin | sin
    # the extension's rotary_apply(x, cos, signed_sin) for float32 CPU tables, or None
    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, heads, head_dim]`` by each token's position, in the tables' dtype. Attention
        narrows q and the cache write k separately: one cast of the whole result would hand SDPA
        strided views, which changed bf16 prefill results (up to 0.9 in a logit). With float32 tables and
        input on CPU the C++ pass (``csrc/rotary.cpp``) computes the same bits in one read of ``x``."""
        if self.kernel is not None and x.dtype == torch.float32 and x.stride(-1) == 1:
            return self.kernel(x, self.cos, self.signed_sin)
        x = x.to(self.cos.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        # The same products and sum as ``x * cos + rotated * sin``, two of its three temporaries reused in place.
        return torch.mul(x, self.cos).add_(torch.cat((x2, x1), dim=-1).mul_(self.signed_sin))


class RotaryEmbedding(nn.Module):
    """Neox-style rotary (rotate halves) over a cos/sin table for every position up to the context length."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(arch)
        t = torch.arange(arch.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(device=device, dtype=dtype), persistent=False)
        ext = load_extension() if torch.device(device).type == "cpu" and dtype == torch.float32 else None
        self.kernel = None if ext is None else ext.rotary_apply

    def lookup(self, positions: torch.Tensor) -> Rotary:
        """``(cos | cos, -sin | sin)`` rows for a step's tokens, ``[T, 1, head_dim]``; built once per
        step so each layer's rotation is one cat, two multiplies and an add (half the ops of the
        textbook form, bit for bit the same: ``a + b·(-s)`` rounds exactly like ``a - b·s``)."""
        cos, sin = self.cos[positions], self.sin[positions]
        return Rotary(torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1),
                      self.kernel)


class DenseLinear(nn.Module):
    """``y = x Wᵀ + b`` in the model's dtype; holds the checkpoint weight during loading."""

    def __init__(self, out_features: int, in_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """SwiGLU with gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up: nn.Module = DenseLinear(2 * intermediate, hidden)
        self.down: nn.Module = DenseLinear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A quantized gate/up on the int8 block kernel gives silu(gate) · up itself (QuantizedLinear.silu_mul).
        h = self.gate_up.silu_mul(x) if isinstance(self.gate_up, QuantizedLinear) else None
        if h is None:
            gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
            h = F.silu(gate).mul_(up)   # in place: one [rows, intermediate] tensor fewer
        return self.down(h)
