"""Projections: dense ``F.linear``, or weight-only int8/int4 with a per-step kernel choice.

A :class:`QuantizedLinear` calls torch's CPU kernels directly (no tensor subclass, whose dispatch
costs more than the matmul on a small model):

* int8: ``torch._weight_int8pack_mm(x, q[N, K], scales[N])``;
* int4: ``torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros[K/group, N, 2])`` over
  weights packed by ``torch._convert_weight_to_int4pack_for_cpu`` *on this host* (the layout
  depends on the CPU's vector width);
* int8 with a scale per group of 32 (GGUF's Q8_0, and every LM head): no torch kernel takes group
  scales for int8. With the engine's C++ extension built (``extension.py``), ``q8_matmul``
  (``csrc/q8_matmul.cpp``) reads the int8 codes once with float32 scales and sums (kind ``int8g``);
  without it the unsigned code ``q + 128 = 16·hi + lo`` runs as two int4 matmuls over the nibble
  planes, ``hi`` with scale ``16·s`` and ``lo`` with ``s`` (kind ``int8x2``: two passes, and the scales
  rounded to bf16, ~0.4 % relative error on the head's logits). Same bytes per weight as int8 either
  way; per-row int8 cost this model 3-4 points of top-1 agreement on the LM head (docs/engine.md).

Both kernels are vectorized only for bf16 activations; fp32 and fp16 fall into a scalar loop
10-100x slower. So the activation is always cast to bf16 first, whatever the model's dtype
(``tests/unit/test_quant_linear.py`` guards this).

They are GEMV-shaped kernels: fastest for a few rows (decode), slower than a GEMM for many (prefill
chunks, large batches). Each call picks by its number of rows (:func:`use_dense`): below ``crossover``
rows the quantized kernel, from it on the large-step copy of the weight when one is kept: bf16 or
float32 for ``F.linear``, whichever :func:`large_step_kernel` measured faster on this CPU, or on request
int8 per output channel for an int8 × int8 GEMM (``int8_gemm.py``: fast, but less accurate), or the
weight's own block codes for the VNNI int8 × int8 kernel (``int8_blocks.py``, ``int8blk``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from inferstack.engine.models.extension import load_extension
from inferstack.engine.models.int8_blocks import Int8Blocks, available, packable
from inferstack.engine.models.int8_gemm import Int8Gemm
from inferstack.engine.weights.quantize import Int4Weight, Int8Weight, QuantWeight

log = logging.getLogger(__name__)

_NO_OFFSET = torch.empty(0)   # q8_matmul's "symmetric" (an empty offset tensor; never written)


def inner_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """With quantized weights, the dtype of everything between a norm and the residual add (the
    projections' outputs, rotary'd keys, attention, the MLP's gate): bf16 when the residual stream is
    fp32. The kernels take bf16 in and give bf16 out, so this keeps a layer to the one cast each norm's
    output needs (twelve casts per layer before); the residual stream, the norms and the rotary
    tables stay fp32, which is where the accuracy lives (docs/engine.md, "Weight formats")."""
    return torch.bfloat16 if act_dtype == torch.float32 else act_dtype


def use_dense(rows: int, crossover: int | None) -> bool:
    """The per-step kernel choice: the bf16 GEMM from ``crossover`` rows on (None: never)."""
    return crossover is not None and rows >= crossover


@dataclass
class PackedWeight:
    """A quantized weight in its kernel's layout, valid only on the host that packed it."""

    kind: str                       # "int8", "int4", "int8g" (grouped int8, C++), "int8x2" (two int4 planes)
    data: torch.Tensor              # int8 [N, K] or the int4 packed layout
    scales: torch.Tensor            # bf16 [N], float32 [N, K / group] (int8g) or bf16 [K / group, N, 2]
    group: int = 0
    low: PackedWeight | None = None   # int8x2: the low nibble plane
    offset: torch.Tensor | None = None   # int8g: float32 [N, K / group], or None (symmetric)
    kernel: ModuleType | None = None     # int8g: the extension that runs it

    @classmethod
    def pack(cls, w: QuantWeight) -> PackedWeight:
        if isinstance(w, Int8Weight) and not w.group:
            return cls("int8", w.q.contiguous(), w.scale.to(torch.bfloat16))
        ext = load_extension() if isinstance(w, Int8Weight) else None
        if isinstance(w, Int8Weight) and ext is not None:
            offset = None if w.offset is None else w.offset.float().contiguous()
            return cls("int8g", w.q.contiguous(), w.scale.float().contiguous(), w.group, offset=offset,
                       kernel=ext)
        if isinstance(w, Int8Weight):
            unsigned = w.q.to(torch.int32) + 128
            zeros = torch.zeros_like(w.scale)
            offset = zeros if w.offset is None else w.offset
            # 16·hi·s + lo·s - 128·s + offset = q·s + offset: the high plane carries the minimum.
            high = cls.pack(Int4Weight(unsigned >> 4, 16 * w.scale, offset - 128 * w.scale, w.group))
            low = cls.pack(Int4Weight(unsigned & 15, w.scale, zeros, w.group))
            return cls("int8x2", high.data, high.scales, w.group, low)
        # torch's dequant is (code - 8) · scale + zero, so zero = minimum + 8 · scale.
        zero = w.minimum + 8 * w.scale
        scales_zeros = torch.stack((w.scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(w.codes.to(torch.int32), 1)
        return cls("int4", packed, scales_zeros, w.group)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` must be bf16 (see the module docstring). bf16 out, but float32 for two planes: their
        partial sums can be large with opposite signs, and adding them in bf16 rounds the difference."""
        if self.kind == "int8":
            return torch._weight_int8pack_mm(x, self.data, self.scales)
        if self.kernel is not None:
            offset = self.offset if self.offset is not None else _NO_OFFSET
            return self.kernel.q8_matmul(x, self.data, self.scales, offset, self.group)
        out = torch._weight_int4pack_mm_for_cpu(x, self.data, self.group, self.scales)
        if self.low is not None:
            return out.float().add_(self.low.matmul(x))   # the in-place add widens the bf16 plane itself
        return out

    def nbytes(self) -> int:
        own = self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()
        own += 0 if self.offset is None else self.offset.numel() * 4
        return own + (self.low.nbytes() if self.low is not None else 0)


class QuantizedLinear(nn.Module):
    """Weight-only quantized projection. Its tensors are plain attributes, not buffers: the packed
    layout is host-specific and must never reach a state dict or a cache."""

    def __init__(self, packed: PackedWeight, dense: LargeCopy | None, bias: torch.Tensor | None,
                 crossover: int | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.packed = packed
        self.dense = dense                      # large steps: bf16/fp32 [N, K], int8 per channel or blocks, or None
        self.bias_ = None if bias is None else bias.to(out_dtype)
        self.crossover = crossover if dense is not None else None
        self.out_dtype = out_dtype
        # An fp32 copy gives fp32 and is left so: narrowing to bf16 here and widening again at the next
        # projection were two copies per matmul for nothing but a rounding (:meth:`wide_from`).
        self.large_out = torch.float32 if self.wide_from() is not None else out_dtype

    @classmethod
    def build(cls, w: QuantWeight, dense_source: torch.Tensor | None, bias: torch.Tensor | None,
              crossover: int | None, out_dtype: torch.dtype, large: str = "bfloat16") -> QuantizedLinear:
        """``large``: the large-step copy's format, ``bfloat16``, ``float32``, ``int8`` or ``int8blk``
        (:func:`large_copy`)."""
        return cls(PackedWeight.pack(w), large_copy(dense_source, large, w), bias, crossover, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_dense(x.shape[0], self.crossover):
            y = large_matmul(self.dense, x, self.large_out)
        else:
            y = self.packed.matmul(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16))
            if y.dtype != self.out_dtype:
                y = y.to(self.out_dtype)
        return y if self.bias_ is None else y + self.bias_

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a fused gate/up projection (gate the first half of the outputs): ``silu(gate) · up`` in one kernel
        call where this step runs on the int8 block copy (``Int8Blocks.silu_mul``), else None (the caller
        splits the plain product)."""
        blocks = self.dense
        if (isinstance(blocks, Int8Blocks) and self.bias_ is None and use_dense(x.shape[0], self.crossover)
                and blocks.fuses_silu_mul()):
            return blocks.silu_mul(x)
        return None

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """``forward(x).argmax(dim=1)`` where this step runs on the int8 block copy (``Int8Blocks.argmax``: the
        product is never written), else None (the caller takes the logits)."""
        blocks = self.dense
        if isinstance(blocks, Int8Blocks) and self.bias_ is None and use_dense(x.shape[0], self.crossover):
            return blocks.argmax(x)
        return None

    def wide_from(self) -> int | None:
        """The fewest rows from which this projection runs on an fp32 copy (None: never). Such a step takes
        its input in fp32 without a cast and returns fp32, so a layer whose projections all do this keeps
        its activations in fp32 from the norm to the residual add (``DecoderLayer``): no bf16 round trip
        around each GEMM, and the same or better accuracy (nothing is rounded to bf16 but the KV cache).
        The block kernel also takes and gives fp32 (it quantizes its input itself)."""
        fp32_copy = isinstance(self.dense, torch.Tensor) and self.dense.dtype == torch.float32
        return self.crossover if fp32_copy or isinstance(self.dense, Int8Blocks) else None

    def memory(self) -> tuple[int, int]:
        """``(quantized bytes, large-step copy bytes)``."""
        if isinstance(self.dense, (Int8Gemm, Int8Blocks)):
            return self.packed.nbytes(), self.dense.nbytes()
        return self.packed.nbytes(), 0 if self.dense is None else self.dense.numel() * self.dense.element_size()


LargeCopy = torch.Tensor | Int8Gemm | Int8Blocks


def large_copy(dense: torch.Tensor | None, large: str, w: QuantWeight | None = None) -> LargeCopy | None:
    """``int8blk`` packs ``w``'s own codes where the kernel runs (a CPU model, :func:`int8_blocks.available`)
    and the shape fits, else falls back to the fp32 copy."""
    if dense is None:
        return None
    if large == "int8":
        return Int8Gemm.quantize(dense)
    fits = large == "int8blk" and w is not None and packable(w) and dense.device.type == "cpu"
    kernel = available() if fits else None
    if kernel is not None and w is not None:
        return Int8Blocks.pack(w, kernel)
    dtype = torch.bfloat16 if large == "bfloat16" else torch.float32
    return dense.to(dtype).contiguous()


def large_matmul(copy: LargeCopy, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x · wᵀ`` on a large-step copy: the int8 GEMMs quantize ``x`` themselves; ``F.linear`` takes ``x`` in
    the copy's dtype (a bf16 input to an fp32 copy widens exactly)."""
    if isinstance(copy, (Int8Gemm, Int8Blocks)):
        return copy.matmul(x, out_dtype)
    y = F.linear(x if x.dtype == copy.dtype else x.to(copy.dtype), copy)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def large_step_kernel(dense: torch.Tensor, rows: int = 64, repeats: int = 15,
                      blocks: QuantWeight | None = None) -> str:
    """``bfloat16``, ``float32`` or ``int8blk``: which large-step copy multiplies ``rows`` rows of ``dense``'s
    shape faster on this CPU (each its fastest undisturbed call, `_undisturbed`). bf16 wins where the CPU has
    AMX or a fast bf16 GEMM (the AMD EPYC: 2x fp32); on an Intel Xeon with AVX-512 bf16 but no AMX
    oneDNN's bf16 GEMM was 1.5x *slower* than fp32 (docs/benchmarks.md). 15 timings each: with 7 (and
    medians), one start in five picked bf16 under load ~18 on 2 cores. Per-channel int8 is never picked
    here: it costs accuracy. ``blocks`` (``dense``'s quantized codes, given only where the caller's accuracy
    floor allows the block kernel, ``quant_loader``) then races the winner on the VNNI block kernel. When
    load disturbs every timing (`first_is_faster` None): the fp32 copy, the most accurate."""
    bf16, fp32 = large_copy(dense, "bfloat16"), large_copy(dense, "float32")
    xb = torch.randn(rows, dense.shape[1]).to(torch.bfloat16)
    bf16_wins = first_is_faster(lambda: large_matmul(bf16, xb, torch.bfloat16),
                            lambda: large_matmul(fp32, xb, torch.bfloat16), repeats)
    kernel = "bfloat16" if bf16_wins else "float32"
    blk = large_copy(dense, "int8blk", blocks) if blocks is not None else None
    if not isinstance(blk, Int8Blocks):
        return kernel
    fast, x = (bf16, xb) if bf16_wins else (fp32, xb.float())
    blk_wins = first_is_faster(lambda: large_matmul(blk, x, torch.float32),
                           lambda: large_matmul(fast, x, torch.float32), repeats)
    return "int8blk" if blk_wins else kernel


# The sizes the start-up measurement tries; none below 8 rows. There the quantized kernels read 2-4x
# fewer bytes than the bf16 copy, and the kernel table (docs/engine.md) has them 1.4-3.8x ahead. A
# timing below 8 rows that says otherwise was disturbed by load, or timed a probe weight that stayed
# in the core's cache (one layer's weight, called repeatedly) where a decode step streams the whole
# model; acting on it would send every small decode step, and the whole LM head, to the bf16 copy.
CROSSOVER_CANDIDATES = (8, 16, 32, 64, 128)
# The crossover when load disturbs every timing: the kernel table's (int4 ahead at 16 rows, behind at 64;
# int8 ahead at 4, behind at 16), rounded up, since a crossover too high costs some speed on mid-size
# batches and one too low sends small decode steps to a weight that is 2-4x more bytes.
TABLE_CROSSOVER = {"int4": 32, "int8": 16}


def _timings(dense: Callable[[], torch.Tensor], quantized: Callable[[], torch.Tensor],
             repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` interleaved timings of each, after one untimed call of each."""
    times: tuple[list[float], list[float]] = ([], [])
    dense(), quantized()
    for _ in range(repeats):
        for fn, out in ((dense, times[0]), (quantized, times[1])):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return times


def _undisturbed(times: list[float]) -> float | None:
    """The kernel's own cost: its fastest call, once a second call comes within 25 % of it (None before).
    Load only ever adds time to a call, so the fastest is the cost as soon as one call ran undisturbed;
    the delays differ from call to call, so two calls that close are two undisturbed ones. The median
    (the previous version) needed most calls undisturbed and, with more runnable threads than cores,
    followed the noise (2 rows at one start, 128 at the next)."""
    if len(times) < 2:      # one call cannot tell an undisturbed one
        return None
    first, second = sorted(times)[:2]
    return first if second <= 1.25 * first else None


def first_is_faster(first: Callable[[], torch.Tensor], second: Callable[[], torch.Tensor],
                    repeats: int) -> bool | None:
    """Whether ``first`` runs faster than ``second`` (here: a large-step GEMM against a quantized kernel or another
    copy; `llama._prefill_wide`: two attention dtypes); None when load disturbed the timings twice running."""
    for _ in range(2):
        costs = [_undisturbed(t) for t in _timings(first, second, repeats)]
        if costs[0] is not None and costs[1] is not None:
            return costs[0] <= costs[1]
    return None


def measure_crossover(w: QuantWeight, candidates: tuple[int, ...] = CROSSOVER_CANDIDATES,
                      repeats: int = 7, large: str = "bfloat16") -> int:
    """The fewest rows from which the large-step GEMM (``large``, as in :func:`large_copy`) beats the
    quantized kernel on ``w`` and stays ahead for every larger candidate; :data:`TABLE_CROSSOVER` when load
    leaves no undisturbed timing at some size (logged). Where the quantized kernel wins at the largest size
    tried, twice that size (logged), never "never": the race speaks for the sizes it timed only, and a prefill
    chunk of hundreds to thousands of rows is compute-bound, where the packed kernels fall far behind (a start
    on a busy host that sent every prefill chunk to the int4 kernel ran 13x slower, docs/engine.md)."""
    packed = PackedWeight.pack(w)
    copy = large_copy(w.dequantize() if isinstance(w, (Int8Weight, Int4Weight)) else w, large, w)
    wins = []
    for rows in candidates:
        x = torch.randn(rows, packed_in_features(copy)).to(torch.bfloat16)
        wins.append(first_is_faster(lambda x=x: large_matmul(copy, x, torch.bfloat16), lambda x=x: packed.matmul(x),
                                repeats))
        if wins[-1] is None:
            table = TABLE_CROSSOVER["int8" if isinstance(w, Int8Weight) else "int4"]
            log.warning("kernel choice: load disturbed every timing at %d rows (no two calls of a kernel "
                        "within 25 %%); taking %d rows from the kernel table (--quant-crossover-rows pins it)",
                        rows, table)
            return table
    crossover = None
    for rows, dense_wins in zip(reversed(candidates), reversed(wins), strict=True):
        if not dense_wins:
            break
        crossover = rows
    if crossover is None:
        crossover = 2 * candidates[-1]
        log.warning("kernel choice: the quantized kernel was ahead at %d rows, the most tried; the large-step "
                    "copy from %d rows (prefill chunks; --quant-crossover-rows pins it)", candidates[-1], crossover)
    return crossover


def packed_in_features(copy: LargeCopy) -> int:
    if isinstance(copy, Int8Blocks):
        return copy.in_features
    return copy.weight_t.shape[0] if isinstance(copy, Int8Gemm) else copy.shape[1]
