"""Model catalog: the HF `config.json` fields the performance model needs, for well-known models.

Any other dense decoder can be added by pointing at its HF-style `config.json` (a path instead of a
catalog name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from inferstack.engine.models.shape import ModelShape, attention_flags, shape_fields

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1, "int8": 1}


@dataclass(kw_only=True)
class ModelSpec(ModelShape):
    """The engine's `ModelShape` (one record, one parser) plus what the performance model needs:
    the served name and the bytes each parameter and each KV element take on the device."""

    name: str                      # reported by /v1/models
    weight_bytes: float = 2.0      # bytes per parameter as stored on the device
    kv_bytes: float = 2.0          # bytes per KV element

    @property
    def total_params(self) -> int:
        return self.count_params()[0]

    @property
    def weight_bytes_total(self) -> float:
        return self.total_params * self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes


def _hf(name: str, architecture: str, **cfg: object) -> dict[str, object]:
    return {"_name": name, "architectures": [architecture], **cfg}


# HF config.json values (public model cards); served names as vLLM would report them.
_CATALOG: dict[str, dict[str, object]] = {
    "llama-3-8b": _hf("meta-llama/Meta-Llama-3-8B-Instruct", "LlamaForCausalLM", num_hidden_layers=32, hidden_size=4096,
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                      vocab_size=128256, max_position_embeddings=8192, torch_dtype="bfloat16"),
    "llama-3-70b": _hf("meta-llama/Meta-Llama-3-70B-Instruct", "LlamaForCausalLM",
                       num_hidden_layers=80, hidden_size=8192,
                       num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                       vocab_size=128256, max_position_embeddings=8192, torch_dtype="bfloat16"),
    "llama-3.1-8b": _hf("meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM", num_hidden_layers=32, hidden_size=4096,
                        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                        vocab_size=128256, max_position_embeddings=131072, torch_dtype="bfloat16"),
    "qwen3-8b": _hf("Qwen/Qwen3-8B", "Qwen3ForCausalLM", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                    max_position_embeddings=40960, torch_dtype="bfloat16"),
    "qwen3-32b": _hf("Qwen/Qwen3-32B", "Qwen3ForCausalLM",
                     num_hidden_layers=64, hidden_size=5120, num_attention_heads=64,
                     num_key_value_heads=8, head_dim=128, intermediate_size=25600, vocab_size=151936,
                     max_position_embeddings=40960, torch_dtype="bfloat16"),
    "qwen2.5-7b": _hf("Qwen/Qwen2.5-7B-Instruct", "Qwen2ForCausalLM", num_hidden_layers=28, hidden_size=3584,
                      num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                      vocab_size=152064, max_position_embeddings=32768, torch_dtype="bfloat16"),
    "mistral-7b": _hf("mistralai/Mistral-7B-Instruct-v0.3", "MistralForCausalLM",
                      num_hidden_layers=32, hidden_size=4096,
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                      vocab_size=32768, max_position_embeddings=32768, torch_dtype="bfloat16"),
    "smollm2-135m": _hf("smollm2-135m", "LlamaForCausalLM",
                        num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                        tie_word_embeddings=True, max_position_embeddings=8192, torch_dtype="float32"),
    "smollm2-360m": _hf("HuggingFaceTB/SmolLM2-360M-Instruct", "LlamaForCausalLM",
                        num_hidden_layers=32, hidden_size=960,
                        num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560,
                        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                        torch_dtype="bfloat16"),
}


class UnknownModel(KeyError):
    pass


def model_names() -> list[str]:
    return sorted(_CATALOG)


def spec_from_hf_config(cfg: dict[str, object], name: str, dtype: str | None = None) -> ModelSpec:
    """Build a ModelSpec from HF `config.json` keys with the engine's parser; `dtype` overrides `torch_dtype`."""
    dt = (dtype or str(cfg.get("torch_dtype", "bfloat16"))).lower()
    if dt not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dt!r}; known: {sorted(_DTYPE_BYTES)}")
    qkv_bias, qk_norm = attention_flags(cfg)
    fields = shape_fields(cfg, f"model config {name!r}", qkv_bias=qkv_bias, qk_norm=qk_norm)
    return ModelSpec(**fields, name=name, weight_bytes=_DTYPE_BYTES[dt], kv_bytes=_DTYPE_BYTES[dt])


def get_model(name_or_path: str, dtype: str | None = None) -> ModelSpec:
    """A catalog model (case-insensitive) or an HF-style config.json (file or directory holding one)."""
    key = name_or_path.lower()
    if key in _CATALOG:
        cfg = dict(_CATALOG[key])
        return spec_from_hf_config(cfg, str(cfg.pop("_name")), dtype)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return spec_from_hf_config(cfg, str(cfg.get("_name_or_path") or path.parent.name), dtype)
    raise UnknownModel(f"unknown model {name_or_path!r}; known: {', '.join(model_names())} "
                       "(or pass the path of an HF config.json)")
