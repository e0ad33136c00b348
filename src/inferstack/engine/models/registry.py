"""Which implementation runs which checkpoint: HF ``architectures`` and GGUF ``general.architecture``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferstack.engine.models.arch import ModelArch, ModelLoadError, arch_from_hf_config
from inferstack.engine.models.contract import CausalLM
from inferstack.engine.models.llama import LlamaForCausalLM
from inferstack.engine.models.shape import ATTENTION_FLAGS


@dataclass(frozen=True)
class ModelFamily:
    model_class: Callable[[ModelArch], CausalLM]
    to_arch: Callable[[dict[str, Any], str, str], ModelArch]   # (config, architecture, source)


def _llama_arch(config: dict[str, Any], architecture: str, source: str) -> ModelArch:
    if config.get("mlp_bias"):
        raise ModelLoadError(f"{source}: mlp_bias=true is not supported for {architecture}")
    return _arch(config, architecture, source)


def _arch(config: dict[str, Any], architecture: str, source: str) -> ModelArch:
    qkv_bias, qk_norm = ATTENTION_FLAGS[architecture](config)
    return arch_from_hf_config(config, architecture, qkv_bias=qkv_bias, qk_norm=qk_norm, source=source)


HF_ARCHITECTURES: dict[str, ModelFamily] = {
    "LlamaForCausalLM": ModelFamily(LlamaForCausalLM, _llama_arch),
    "MistralForCausalLM": ModelFamily(LlamaForCausalLM, _llama_arch),
    "Qwen2ForCausalLM": ModelFamily(LlamaForCausalLM, _arch),
    "Qwen3ForCausalLM": ModelFamily(LlamaForCausalLM, _arch),
}

# GGUF ``general.architecture`` → the HF architecture whose tensor names and config we convert to,
# and whether llama.cpp permuted Q/K rows for its interleaved rotary (its converter does this for
# Llama-architecture models only; Qwen2/Qwen3 use NeoX rotary and are stored as-is).
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}


def family_for(config: dict[str, Any], source: str) -> tuple[str, ModelFamily]:
    archs = config.get("architectures") or []
    for name in archs:
        if name in HF_ARCHITECTURES:
            return name, HF_ARCHITECTURES[name]
    raise ModelLoadError(
        f"{source}: unknown architecture {archs or config.get('model_type')!r}; expected one of "
        f"{sorted(HF_ARCHITECTURES)} in config.json 'architectures'")
