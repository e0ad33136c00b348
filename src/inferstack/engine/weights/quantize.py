"""Weight-only quantized formats in their host-independent ("unpacked") form.

* :class:`Int8Weight`: int8, one scale per output row (``w ≈ q · scale``), or per group of ``group``
  input columns (GGUF's Q8_0 layout; run as two 4-bit planes, see ``quant_linear``), optionally
  with an offset per group (``w ≈ q · scale + offset``, min/max over 255 steps). ``--quantization
  int8`` makes the grouped form, symmetric or min/max per tensor, whichever is closer: the min/max
  grid holds every 4-bit min/max grid of the same group exactly (255 = 15 · 17) and the symmetric one
  holds Q8_0 exactly, so a checkpoint that was quantized once (the bundled Q4_1 GGUF with its Q8_0
  head) loses nothing, where per-row int8 re-rounds every weight (docs/engine.md).
* :class:`Int4Weight`: 4-bit codes 0..15 in groups of ``group`` input columns, one scale and one
  minimum per (row, group) (``w ≈ code · scale + minimum``), the shape of GGUF's Q4_1 and of the
  sub-blocks of Q4_K; Q4_0 is the special case ``minimum = -8 · scale``.

These are what the conversion cache stores (:mod:`inferstack.engine.weights.quant_cache`). The
kernels' packed layouts are built from them on the host that runs them
(:mod:`inferstack.engine.models.quant_linear`): torch's int4 layout depends on the CPU's vector
width, so a packed tensor must never travel between hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Quantization = Literal["none", "int8", "int4", "gguf"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4", "gguf")
INT4_GROUPS = (32, 64, 128)


@dataclass
class Int8Weight:
    q: torch.Tensor          # [N, K] int8
    scale: torch.Tensor      # [N] float32 (per row), or [N, K / group] with ``group``
    exact: bool = False      # the codes and scales are the checkpoint's own (no rounding by us)
    group: int = 0           # 0: one scale per row
    offset: torch.Tensor | None = None   # [N, K / group] float32 with ``group``; None: symmetric

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        if not self.group:
            return self.q.float() * self.scale[:, None]
        n, k = self.q.shape
        grouped = self.q.view(n, k // self.group, self.group).float() * self.scale[..., None]
        if self.offset is not None:
            grouped += self.offset[..., None]
        return grouped.view(n, k)


@dataclass
class Int4Weight:
    codes: torch.Tensor      # [N, K] uint8 in 0..15
    scale: torch.Tensor      # [N, K / group] float32
    minimum: torch.Tensor    # [N, K / group] float32
    group: int
    exact: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        grouped = self.codes.view(n, k // self.group, self.group).float()
        return (grouped * self.scale[..., None] + self.minimum[..., None]).view(n, k)


QuantWeight = Int8Weight | Int4Weight


def quantize_int8(w: torch.Tensor, group: int = 0) -> Int8Weight:
    """Round-to-nearest symmetric int8 per output row, or per ``group`` columns (zero blocks get scale 1)."""
    n, k = w.shape
    grouped = w.float().view(n, k // group, group) if group else w.float()[:, None, :]
    amax = grouped.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(grouped / scale[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)
    return Int8Weight(q, scale if group else scale[:, 0], group=group)


def _minmax_grid(w: torch.Tensor, group: int, steps: int, name: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` even steps from each group's minimum to its maximum, in float32 (llama.cpp's Q4_1
    rule): ``(codes 0..steps as float [N, K/group, group], scale, minimum)``; a constant group gets
    scale 0 and codes 0."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"{name} group {group} does not divide the input width {k}")
    grouped = w.float().view(n, k // group, group)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = (hi - lo) / steps
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round((grouped - lo[..., None]) * inv[..., None]).clamp_(0, steps)
    return codes, scale, lo


def quantize_int8_asym(w: torch.Tensor, group: int) -> Int8Weight:
    """Min/max int8 per group of ``group`` columns: 255 steps from the group's minimum, stored as
    ``q = code - 128`` with ``offset = minimum + 128 · scale``."""
    codes, scale, lo = _minmax_grid(w, group, 255, "int8")
    q = (codes - 128).to(torch.int8).view(w.shape)
    return Int8Weight(q, scale, group=group, offset=lo + 128 * scale)


def quantize_int8_grouped(w: torch.Tensor, group: int) -> Int8Weight:
    """Symmetric or min/max int8 per group, whichever reconstructs ``w`` with the smaller squared error:
    each is exact for one kind of checkpoint history (Q8_0's symmetric grid, Q4_*'s min/max grid), and
    both run on the same kernel at the same cost."""
    candidates = (quantize_int8(w, group), quantize_int8_asym(w, group))
    return min(candidates, key=lambda c: (c.dequantize() - w.float()).square().sum().item())


def quantize_int4(w: torch.Tensor, group: int) -> Int4Weight:
    """Asymmetric min/max int4 per group of ``group`` columns (llama.cpp's Q4_1 rule, in float32)."""
    codes, scale, lo = _minmax_grid(w, group, 15, "int4")
    return Int4Weight(codes.to(torch.uint8).view(w.shape), scale, lo, group)


def int4_group_for(k: int, wanted: int) -> int:
    """The largest supported group ≤ ``wanted`` that divides ``k`` (0 when none does)."""
    return next((g for g in sorted(INT4_GROUPS, reverse=True) if g <= wanted and k % g == 0), 0)


def concat_rows(parts: list[QuantWeight]) -> QuantWeight | None:
    """Fuse row blocks (Q/K/V, gate/up) into one weight; None when their formats differ."""
    first = parts[0]
    if isinstance(first, Int8Weight) and all(isinstance(p, Int8Weight) and p.group == first.group
                                             and (p.offset is None) == (first.offset is None) for p in parts):
        offset = None if first.offset is None else torch.cat([p.offset for p in parts])
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          exact=all(p.exact for p in parts), group=first.group, offset=offset)
    if isinstance(first, Int4Weight) and all(isinstance(p, Int4Weight) and p.group == first.group
                                             for p in parts):
        return Int4Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.minimum for p in parts]), first.group,
                          exact=all(p.exact for p in parts))
    return None


def permute_rows(w: QuantWeight, order: torch.Tensor) -> QuantWeight:
    """The same weight with its output rows reordered (undoing llama.cpp's Q/K permutation)."""
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q[order], w.scale[order], w.exact, w.group,
                          None if w.offset is None else w.offset[order])
    return Int4Weight(w.codes[order], w.scale[order], w.minimum[order], w.group, w.exact)
