"""ModelArch: the hyper-parameters every model family reduces to, read from an HF ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class ModelLoadError(ValueError):
    """A model reference, its configuration or its weights cannot be loaded; the message says what and why."""


@dataclass
class ModelArch:
    architecture: str                 # HF class name, e.g. "LlamaForCausalLM"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: torch.dtype = torch.float32
    num_params: int = 0
    weight_bytes_per_step: int = 0
    # Per-frequency divisors for rotary (llama.cpp stores Llama 3 scaling this way in a GGUF).
    rope_freq_factors: list[float] | None = field(default=None, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def count_params(self) -> tuple[int, int]:
        """``(num_params, params a decode step reads)``; a tied embedding counts once, as the LM head."""
        h, inter, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size if self.qkv_bias else 0)
        attn = qkv + self.q_size * h + (2 * self.head_dim if self.qk_norm else 0)
        layer = attn + 3 * h * inter + 2 * h
        body = self.num_layers * layer + h
        embed = v * h
        total = body + embed + (0 if self.tie_word_embeddings else embed)
        # A step reads one embedding row per token (negligible) and the whole LM head.
        return total, body + embed

    def finalize(self, dtype: torch.dtype) -> ModelArch:
        self.dtype = dtype
        self.num_params, read = self.count_params()
        self.weight_bytes_per_step = read * torch.empty((), dtype=dtype).element_size()
        return self


def _get(config: dict[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ModelLoadError(f"{source}: missing required key {key!r}")
    return config[key]


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling)`` from either transformers 5 ``rope_parameters`` or the older keys."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(config.get("rope_theta", 10000.0))
        scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def arch_from_hf_config(config: dict[str, Any], architecture: str, *, qkv_bias: bool, qk_norm: bool,
                        source: str) -> ModelArch:
    hidden = int(_get(config, "hidden_size", source))
    heads = int(_get(config, "num_attention_heads", source))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads={heads} is not a multiple of "
                               f"num_key_value_heads={kv_heads}")
    theta, scaling = rope_settings(config)
    max_pos = int(config.get("max_position_embeddings") or 2048)
    # Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full attention as
    # long as no sequence is longer than the window, so we cap the context length there instead of
    # implementing the window.
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", True) and window
    if uses_window and int(window) < max_pos:
        max_pos = int(window)
    return ModelArch(
        architecture=architecture,
        num_layers=int(_get(config, "num_hidden_layers", source)),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_get(config, "intermediate_size", source)),
        vocab_size=int(_get(config, "vocab_size", source)),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        rope_freq_factors=config.get("inferstack_rope_freq_factors"),
    )
