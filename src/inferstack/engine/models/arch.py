"""ModelArch: the hyper-parameters every model family reduces to, read from an HF ``config.json``
(its shapes are the shared `ModelShape`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from inferstack.engine.models.shape import ModelLoadError, ModelShape, shape_fields

__all__ = ["ModelArch", "ModelLoadError", "arch_from_hf_config", "rope_settings"]


@dataclass(kw_only=True)
class ModelArch(ModelShape):
    """The shapes (`ModelShape`, shared with the simulator) plus what the torch model needs to run."""

    architecture: str                 # HF class name, e.g. "LlamaForCausalLM"
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    dtype: torch.dtype = torch.float32
    num_params: int = 0
    weight_bytes_per_step: int = 0
    # Per-frequency divisors for rotary (llama.cpp stores Llama 3 scaling this way in a GGUF).
    rope_freq_factors: list[float] | None = field(default=None, repr=False)

    def finalize(self, dtype: torch.dtype) -> ModelArch:
        self.dtype = dtype
        self.num_params, read = self.count_params()
        self.weight_bytes_per_step = read * torch.empty((), dtype=dtype).element_size()
        return self


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
    theta, scaling = rope_settings(config)
    return ModelArch(
        **shape_fields(config, source, qkv_bias=qkv_bias, qk_norm=qk_norm),
        architecture=architecture,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_freq_factors=config.get("inferstack_rope_freq_factors"),
    )
