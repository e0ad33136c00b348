"""The contract between the model runner (builds it per step) and the attention op (reads it).

Tokens of all scheduled sequences are packed into one flat batch of ``T`` tokens, sequence by
sequence. KV for each layer lives in a paged cache tensor of shape
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0 = K, 1 = V); with an int8/fp8 cache the
last dimension is the format's row (codes and scale, executor/kv_format.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferstack.engine.executor.kv_format import KVFormat


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [T] int64: block_id * block_size + offset where each new token's K/V goes
    query_start_loc: torch.Tensor  # [B + 1] int64: sequence b's new tokens are [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor         # [B] int64: context length of sequence b after this step (cached + new)
    block_tables: torch.Tensor     # [B, max_blocks] int64: physical block ids, padded with 0
    query_lens_list: list[int]     # host copies, so the op never syncs a device tensor to branch
    seq_lens_list: list[int]
    block_size: int
    kv_format: KVFormat | None = None   # how rows are stored (executor/kv_format.py); None: as the activations
    # external KV still landing layer by layer (a NIXL READ): called with a layer's index before it runs
    wait_for_layer: Callable[[int], None] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_pure_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)
