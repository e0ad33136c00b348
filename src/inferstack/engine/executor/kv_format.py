"""How K/V rows are stored in the paged cache (`--kv-cache-dtype`, docs/engine.md "KV cache precision").

* ``auto``: the dtype attention computes in: the model's activation dtype, except bfloat16 when the
  weights are int8/int4 (their activations are float32 only in the residual stream and the norms;
  ``models/quant_linear.inner_dtype``);
* ``float32`` / ``bfloat16`` / ``float16``: plain casts;
* ``int8`` / ``fp8_e4m3``: one byte per element plus a float32 scale per (token, KV head), stored in
  the same row right after the codes. A cache tensor is then ``uint8 [2, blocks, block_size,
  kv_heads, head_dim + 4]``: each block carries its own scales, so everything that moves blocks
  (prefix cache reuse, KV store tiers, prefill→decode transfer) moves them without knowing the
  format, and a block written one token at a time never needs its earlier rows requantized.

Rows are quantized once when written and dequantized to the activation dtype when read; only a
prefill chunk with nothing cached before it attends over its own exact K/V (it never reads the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferstack.engine.config import KV_CACHE_DTYPES
from inferstack.engine.models.quant_linear import inner_dtype

_PLAIN = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
SCALE_BYTES = 4


@dataclass(frozen=True)
class KVFormat:
    name: str                 # one of KV_CACHE_DTYPES but "auto"
    compute: torch.dtype      # the activations' dtype: what attention reads back
    head_dim: int

    @classmethod
    def resolve(cls, requested: str, compute: torch.dtype, head_dim: int, quantized_weights: bool) -> KVFormat:
        if requested not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {requested!r}")
        if quantized_weights:
            compute = inner_dtype(compute)   # attention runs in the projections' output dtype
        if requested == "auto":
            requested = str(compute).removeprefix("torch.")
        return cls(requested, compute, head_dim)

    @property
    def quantized(self) -> bool:
        return self.name in _QMAX

    @property
    def storage(self) -> torch.dtype:
        return torch.uint8 if self.quantized else _PLAIN[self.name]

    @property
    def row(self) -> int:
        """Storage elements per (token, KV head)."""
        return self.head_dim + SCALE_BYTES if self.quantized else self.head_dim

    def bytes_per_row(self) -> int:
        return self.row * torch.empty((), dtype=self.storage).element_size()

    def key_suffix(self) -> str:
        """The KV key space's part for this format ('' when the cache holds the activations as they are)."""
        return "" if self.storage == self.compute else f"+kv-{self.name}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, kv_heads, head_dim]`` activations → ``[T, kv_heads * row]`` cache rows."""
        t = x.shape[0]
        if not self.quantized:
            x = x.reshape(t, -1)
            return x if x.dtype == self.storage else x.to(self.storage)
        xf = x.float()
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / _QMAX[self.name]
        scaled = xf / scale
        if self.name == "int8":
            codes = scaled.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        else:
            codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat((codes, scale.view(torch.uint8)), dim=-1).reshape(t, -1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., row]`` cache rows → ``[..., head_dim]`` in the activation dtype."""
        if not self.quantized:
            return rows if rows.dtype == self.compute else rows.to(self.compute)
        codes = rows[..., :self.head_dim]
        scale = rows[..., self.head_dim:].contiguous().view(torch.float32)
        values = codes.view(torch.int8 if self.name == "int8" else torch.float8_e4m3fn).to(torch.float32)
        return (values * scale).to(self.compute)
