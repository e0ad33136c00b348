"""Copies between the paged KV cache (per layer ``[2, num_blocks, block_size, H, D]``) and chunk
tensors (``[num_layers, 2, n * block_size, H, D]``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from inferstack.engine.kv.hashing import BLOCKS_PER_CHUNK


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


@dataclass
class StagedLoad:
    """External KV held on the host for one request until its blocks are allocated.

    ``chunks[i]`` covers request blocks ``[(c0 + i) * 16, (c0 + i + 1) * 16)`` where
    ``c0 = first_block // 16`` (the last chunk may be shorter); blocks ``first_block ..
    first_block + num_blocks - 1`` are the ones to load.
    """

    first_block: int
    num_blocks: int
    chunks: list[torch.Tensor]
    block_ids: list[int] = field(default_factory=list)

    def accept(self, block_ids: Sequence[int], num_external_tokens: int, block_size: int) -> None:
        self.num_blocks = min(self.num_blocks, num_external_tokens // block_size)
        self.block_ids = list(block_ids[self.first_block:self.first_block + self.num_blocks])

    def copy_into(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> None:
        block, done = self.first_block, 0
        for chunk in self.chunks:
            offset = block % BLOCKS_PER_CHUNK
            n = min(BLOCKS_PER_CHUNK - offset, self.num_blocks - done)
            if n <= 0:
                break
            scatter_into_blocks(kv_caches, self.block_ids[done:done + n],
                                chunk[:, :, offset * block_size:(offset + n) * block_size])
            block += n
            done += n
