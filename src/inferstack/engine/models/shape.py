"""ModelShape: the one record of a decoder's shapes, read from an HF ``config.json`` by one parser.

The torch engine (`ModelArch` adds rotary, norms and dtype), the emulated engine and the simulator
(`sim.models.ModelSpec` adds the stored bytes per parameter and per KV element) all extend this record,
so they agree on context length, attention biases, q/k norms and parameter counts. No torch here: the
simulator imports it without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The context length HF's configs assume when `max_position_embeddings` is absent (LlamaConfig's default).
DEFAULT_CONTEXT = 2048


class ModelLoadError(ValueError):
    """A model reference, its configuration or its weights cannot be loaded; the message says what and why."""


@dataclass(kw_only=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: q/k/v/o projections (with biases), q/k norms, SwiGLU MLP, two RMSNorms."""
        h = self.hidden_size
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size if self.qkv_bias else 0)
        attn = qkv + self.q_size * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def count_params(self) -> tuple[int, int]:
        """``(num_params, params a decode step reads)``; a tied embedding counts once, as the LM head."""
        body = self.num_layers * self.layer_params + self.hidden_size     # + the final norm
        embed = self.embedding_params
        total = body + embed + (0 if self.tie_word_embeddings else embed)
        # A step reads one embedding row per token (negligible) and the whole LM head.
        return total, body + embed


def _get(config: dict[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ModelLoadError(f"{source}: missing required key {key!r}")
    return config[key]


def shape_fields(config: dict[str, Any], source: str, *, qkv_bias: bool, qk_norm: bool) -> dict[str, Any]:
    """The `ModelShape` fields of an HF config (for a subclass to add its own)."""
    hidden = int(_get(config, "hidden_size", source))
    heads = int(_get(config, "num_attention_heads", source))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
    max_pos = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)
    # Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full attention as
    # long as no sequence is longer than the window, so we cap the context length there instead of
    # implementing the window.
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", True) and window
    if uses_window and int(window) < max_pos:
        max_pos = int(window)
    return {"num_layers": int(_get(config, "num_hidden_layers", source)), "hidden_size": hidden,
            "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": int(_get(config, "intermediate_size", source)),
            "vocab_size": int(_get(config, "vocab_size", source)), "max_position_embeddings": max_pos,
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
            "qkv_bias": qkv_bias, "qk_norm": qk_norm}


# Attention details each HF architecture implies: (qkv_bias, qk_norm) from its config.
ATTENTION_FLAGS: dict[str, Callable[[dict[str, Any]], tuple[bool, bool]]] = {
    "LlamaForCausalLM": lambda c: (bool(c.get("attention_bias", False)), False),
    "MistralForCausalLM": lambda c: (bool(c.get("attention_bias", False)), False),
    "Qwen2ForCausalLM": lambda c: (True, False),
    "Qwen3ForCausalLM": lambda c: (bool(c.get("attention_bias", False)), True),
}


def attention_flags(config: dict[str, Any]) -> tuple[bool, bool]:
    """(qkv_bias, qk_norm) for the config's first known architecture; Llama's rules otherwise."""
    for name in config.get("architectures") or []:
        if name in ATTENTION_FLAGS:
            return ATTENTION_FLAGS[name](config)
    return ATTENTION_FLAGS["LlamaForCausalLM"](config)
