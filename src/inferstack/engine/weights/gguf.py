"""GGUF files → an HF-style directory in the cache (config, tokenizer files, dequantized safetensors).

A GGUF is read once with the ``gguf`` package: hyper-parameters become a ``config.json``, the
tokenizer becomes ``tokenizer.json``/``tokenizer_config.json`` and every tensor is dequantized to
the requested dtype, renamed to transformers' names and, for Llama-architecture files, has
llama.cpp's Q/K row permutation undone. The result lands under
``$INFERSTACK_CACHE_DIR`` (default ``~/.cache/inferstack``) in ``gguf/<stem>-<digest>/``, keyed by
the file's model digest (sha256 of its bytes), with one ``weights-<dtype>.safetensors`` per
dtype; each file is written to a temporary name and renamed, so concurrent loaders never see a
partial file. Later loads skip the GGUF parse and the dequantization entirely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferstack.engine.kv.hashing import model_digest
from inferstack.engine.models.arch import ModelLoadError
from inferstack.engine.models.registry import GGUF_ARCHITECTURES
from inferstack.fileio import atomic_path, atomic_write
from inferstack.paths import cache_root

# Types we dequantize (gguf.quants has numpy kernels for all of them).
SUPPORTED_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass
class ConvertedGGUF:
    model_dir: Path          # config.json, tokenizer.json, tokenizer_config.json, generation_config.json
    weight_files: list[Path]


def converted_dir(path: Path) -> Path:
    return cache_root() / "gguf" / f"{path.stem}-{model_digest([path])[:16]}"


def convert_gguf_metadata(path: Path, reader: Any | None = None) -> Path:
    """The cached directory holding ``path``'s config and tokenizer files, writing them on first use."""
    out_dir = converted_dir(path)
    if all((out_dir / name).exists() for name in TOKENIZER_FILES):
        return out_dir
    from inferstack.engine.weights.gguf_tokenizer import tokenizer_files_from_gguf

    reader = reader or open_gguf(path)
    config = hf_config_from_gguf(reader, path)
    tokenizer_json, tokenizer_config, eos_ids = tokenizer_files_from_gguf(reader, path)
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "tokenizer.json", tokenizer_json.encode())
    atomic_write(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=1).encode())
    atomic_write(out_dir / "generation_config.json", json.dumps({"eos_token_id": eos_ids}).encode())
    atomic_write(out_dir / "config.json", json.dumps(config, indent=1).encode())  # last: marks completion
    return out_dir


def convert_gguf(path: Path, dtype: torch.dtype,
                 progress: Callable[[str], None] | None = None) -> ConvertedGGUF:
    """The cached HF-style conversion of ``path`` in ``dtype``, creating it on first use."""
    out_dir = converted_dir(path)
    weights = out_dir / f"weights-{_DTYPE_NAMES[dtype]}.safetensors"
    if weights.exists() and all((out_dir / name).exists() for name in TOKENIZER_FILES):
        return ConvertedGGUF(out_dir, [weights])
    reader = open_gguf(path)
    convert_gguf_metadata(path, reader)
    if not weights.exists():
        if progress:
            progress(f"dequantizing {path.name} to {_DTYPE_NAMES[dtype]} (once; cached in {out_dir})")
        save_safetensors_atomic(hf_tensors_from_gguf(reader, path, dtype), weights, {"source": path.name})
    return ConvertedGGUF(out_dir, [weights])


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write under a temporary name and rename, so concurrent loaders never read a partial file."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError when the data ends early
        size = path.stat().st_size
        raise ModelLoadError(f"{path}: GGUF file is truncated or corrupt ({size} bytes; reading it failed "
                             f"with {type(e).__name__}: {e}); download it again") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _require(reader: Any, key: str, path: Path) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelLoadError(f"{path}: missing GGUF metadata key {key!r}")
    return value


def gguf_architecture(reader: Any, path: Path) -> tuple[str, str, bool]:
    """``(gguf arch, HF architecture, Q/K permuted by llama.cpp)``."""
    arch = _require(reader, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: unknown architecture {arch!r} (general.architecture); supported: "
                             f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    hf_arch, permuted = GGUF_ARCHITECTURES[arch]
    return arch, hf_arch, permuted


def hf_config_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    arch, hf_arch, _ = gguf_architecture(reader, path)
    names = {t.name for t in reader.tensors}
    hidden = int(_require(reader, f"{arch}.embedding_length", path))
    heads = int(_require(reader, f"{arch}.attention.head_count", path))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelLoadError(f"{path}: missing tensor token_embd.weight")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": hf_arch.removesuffix("ForCausalLM").lower(),
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_require(reader, f"{arch}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(embd.shape[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
    }
    if int(_field(reader, f"{arch}.expert_count", 0) or 0) > 0:
        raise ModelLoadError(f"{path}: mixture-of-experts models are not supported yet")
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != config["head_dim"]:
        raise ModelLoadError(f"{path}: partial rotary ({arch}.rope.dimension_count={rope_dim} < head_dim "
                             f"{config['head_dim']}) is not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported (supported: linear, "
                                 "and Llama 3 frequency factors)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_require(
            reader, f"{arch}.rope.scaling.factor", path))}
    if "rope_freqs.weight" in names:  # Llama 3.1+: per-frequency divisors stored as a tensor
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        config["inferstack_rope_freq_factors"] = _dequantize(t, path).reshape(-1).tolist()
    return config


def hf_tensors_from_gguf(reader: Any, path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All weight tensors dequantized to ``dtype`` under transformers' names."""
    arch, _, permuted = gguf_architecture(reader, path)
    heads = int(_require(reader, f"{arch}.attention.head_count", path))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.json
        name = hf_tensor_name(t.name, path)
        values = _dequantize(t, path)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute_qk(values, heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute_qk(values, kv_heads)
        if not values.flags.writeable or not values.flags.c_contiguous:  # F32 tensors are views of the mmap
            values = np.array(values, copy=True, order="C")
        out[name] = torch.from_numpy(values).to(dtype)
    return out


def hf_tensor_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    raise ModelLoadError(f"{path}: unexpected tensor {gguf_name!r}; expected token_embd, output_norm, output, "
                         f"rope_freqs or blk.N.{{{', '.join(k.split('.')[0] for k in _LAYER_TENSORS)}}}")


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of a transformers tensor name (for error messages about GGUF files)."""
    for g, h in _GLOBAL_TENSORS.items():
        if h == hf_name:
            return g
    parts = hf_name.removeprefix("model.layers.").split(".", 1)
    for g, h in _LAYER_TENSORS.items():
        if len(parts) == 2 and h == parts[1]:
            return f"blk.{parts[0]}.{g}"
    return hf_name


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has type {kind}, which we cannot dequantize; "
                             f"supported: {', '.join(sorted(SUPPORTED_TYPES))}")
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: it interleaves each head's two rotary halves for its GPT-J-style
    rotary kernel; transformers (and we) rotate halves NeoX-style."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


