"""Copies between the paged KV cache (per layer ``[2, num_blocks, block_size, H, D]``) and chunk
tensors (``[num_layers, 2, n * block_size, H, D]``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _index(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(block_ids), dtype=torch.long, device=device)


def scatter_into_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], src: torch.Tensor) -> None:
    """Write ``src`` (n blocks' worth of tokens, all layers) into blocks ``block_ids``."""
    _, _, bs, heads, dim = kv_caches[0].shape
    n = len(block_ids)
    ids = _index(block_ids, kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, ids, src[layer].view(2, n, bs, heads, dim).to(cache.device, non_blocking=True))


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> None:
    """Read blocks ``block_ids`` of every layer into ``out`` (contiguous, on the caches' device
    or the host)."""
    _, _, bs, heads, dim = kv_caches[0].shape
    n = len(block_ids)
    ids = _index(block_ids, kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        dst = out[layer].view(2, n, bs, heads, dim)
        if dst.device == cache.device:
            torch.index_select(cache, 1, ids, out=dst)
        else:
            dst.copy_(cache.index_select(1, ids))
