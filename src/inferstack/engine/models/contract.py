"""The model contract: what the weight loader and the torch executor need from a model class.

A model is an `nn.Module` (the loader casts it with `to`, allocates it with `_apply` and calls `eval`) that also
provides these methods; `LlamaForCausalLM` is the one implementation, serving Llama, Mistral,
Qwen2 and Qwen3 checkpoints (engine/models/registry.py). A new family implements `CausalLM` and
registers a `ModelFamily`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, Self

import torch

from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.models.arch import ModelArch


class WeightTarget(NamedTuple):
    """Where one checkpoint tensor goes: a view into a (possibly fused) parameter, and its shape."""

    dest: torch.Tensor
    shape: tuple[int, ...]


class Projection(NamedTuple):
    """A matmul weight the loader may swap for a quantized kernel (``parent.attr``)."""

    parent: torch.nn.Module
    attr: str
    parts: tuple[str, ...]      # checkpoint tensor names fused into it, in row order


class CausalLM(Protocol):
    arch: ModelArch

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        """``input_ids``/``positions [T]`` -> final hidden states ``[T, hidden]``; writes K/V into the
        paged ``kv_caches`` at the slots in ``meta`` before attention reads them."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[N, hidden]`` -> float32 logits ``[N, vocab]``."""

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax of ``compute_logits(hidden)`` per row ``[N]`` int64 when the model has a faster way to it
        than the logits, else None (the executor then computes the logits)."""

    def weight_targets(self) -> dict[str, WeightTarget]:
        """Checkpoint tensor name (transformers' naming) -> where it is copied."""

    def projections(self) -> list[Projection]:
        """Every matmul weight, for the loader's quantization pass."""

    def init_buffers(self) -> None:
        """Compute the non-checkpoint state (e.g. rotary tables) once the weights are on their device."""

    # the nn.Module methods the loader uses
    def to(self, *args: object, **kwargs: object) -> Self: ...
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self: ...
    def eval(self) -> Self: ...
