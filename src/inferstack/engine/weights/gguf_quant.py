"""A GGUF's weights in our int8/int4 formats, keeping the file's own precision (``--quantization gguf``).

* Q4_0, Q4_1 and Q4_K become :class:`Int4Weight` with group 32 **exactly**: the 4-bit codes are the
  file's, and each block's (or Q4_K sub-block's) scale and minimum are the file's values
  (Q4_0: ``minimum = -8·d``; Q4_1: ``m``; Q4_K: ``d·sc`` and ``-dmin·m``). Only the kernel's bf16
  scale/zero pairs round them.
* Q8_0 becomes :class:`Int8Weight` with group 32 **exactly** (codes and fp16 scales are the file's).
* Other types are **requantized** from their dequantized values: Q5_*, Q6_K and float tensors to
  int8 with a scale per 32 columns, Q2_K/Q3_K to int4 g32.

The load log says which tensors were exact and which were requantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferstack.engine.weights.gguf import _dequantize, gguf_architecture, hf_tensor_name, unpermute_qk
from inferstack.engine.weights.quantize import (
    Int4Weight,
    Int8Weight,
    QuantWeight,
    permute_rows,
    quantize_int4,
    quantize_int8,
)

_INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q2_K", "Q3_K"})
_EXACT_INT4 = frozenset({"Q4_0", "Q4_1", "Q4_K"})


def _nibbles(qs: np.ndarray, n_blocks: int, group: int) -> np.ndarray:
    """GGUF's nibble layout: byte j of a 32-value run holds value j (low) and value j + 16 (high)."""
    qs = qs.reshape(n_blocks, -1, 1, group // 2) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & np.uint8(0x0F)).reshape(n_blocks, -1)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def exact_int4(tensor: Any) -> Int4Weight:
    """Codes, scales and minimums of a Q4_0 / Q4_1 / Q4_K tensor, read from its blocks."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import Q4_K

    kind = tensor.tensor_type
    rows, cols = (int(d) for d in reversed(tensor.shape))
    _, type_size = GGML_QUANT_SIZES[kind]
    blocks = np.asarray(tensor.data).reshape(-1, type_size)
    n = blocks.shape[0]
    if kind.name == "Q4_0":
        d = _f16(blocks[:, :2])
        scale, minimum, codes = d, -8 * d, _nibbles(blocks[:, 2:], n, 32)
    elif kind.name == "Q4_1":
        scale, minimum, codes = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), _nibbles(blocks[:, 4:], n, 32)
    else:  # Q4_K: 256 values as 8 sub-blocks of 32, each with a 6-bit scale and min
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, m = Q4_K.get_scale_min(blocks[:, 4:4 + Q4_K.K_SCALE_SIZE])
        scale, minimum = d * sc.astype(np.float32), -dmin * m.astype(np.float32)
        codes = _nibbles(blocks[:, 4 + Q4_K.K_SCALE_SIZE:], n, 64)
    groups = cols // 32
    return Int4Weight(torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols)),
                      torch.from_numpy(scale.reshape(rows, groups).copy()),
                      torch.from_numpy(minimum.reshape(rows, groups).copy()), 32, exact=True)


def exact_int8(tensor: Any) -> Int8Weight:
    """Codes and scales of a Q8_0 tensor (blocks of an fp16 scale and 32 int8 codes)."""
    rows, cols = (int(d) for d in reversed(tensor.shape))
    blocks = np.asarray(tensor.data).reshape(-1, 34)
    codes = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(rows, cols)
    scale = _f16(blocks[:, :2]).reshape(rows, cols // 32)
    return Int8Weight(torch.from_numpy(codes.copy()), torch.from_numpy(scale.copy()), exact=True, group=32)


def gguf_quant_weights(reader: Any, path: Path) -> tuple[dict[str, QuantWeight], dict[str, str]]:
    """Every 2-D weight of the file (transformers' names) in int8/int4, and ``{name: how}`` for the log."""
    arch, _, permuted = gguf_architecture(reader, path)
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    out: dict[str, QuantWeight] = {}
    how: dict[str, str] = {}
    for t in reader.tensors:
        if len(t.shape) != 2 or t.name == "rope_freqs.weight":
            continue
        name = hf_tensor_name(t.name, path)
        kind = t.tensor_type.name
        if kind in _EXACT_INT4 and int(t.shape[0]) % 32 == 0:
            weight: QuantWeight = exact_int4(t)
            how[name] = f"{kind} → int4 g32 (exact codes)"
        elif kind == "Q8_0":
            weight = exact_int8(t)
            how[name] = f"{kind} → int8 g32 (exact codes)"
        else:
            dense = torch.from_numpy(np.array(_dequantize(t, path), dtype=np.float32, order="C"))
            group = 32 if dense.shape[1] % 32 == 0 else 0
            to_int4 = kind in _INT4_TYPES and group
            weight = quantize_int4(dense, 32) if to_int4 else quantize_int8(dense, group)
            how[name] = f"{kind} → {'int4' if to_int4 else 'int8'}{' g32' if group else ''} (requantized)"
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = heads if "q_proj" in name else kv_heads
            order = unpermute_qk(np.arange(weight.shape[0])[:, None], n_head)[:, 0]
            weight = permute_rows(weight, torch.from_numpy(np.ascontiguousarray(order)))
        out[name] = weight
    return out, how
