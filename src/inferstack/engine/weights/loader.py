"""``load_model(spec)``: an HF directory, a ``.gguf`` file or an alias → torch module + tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inferstack.engine.kv.hashing import model_digest
from inferstack.engine.models.arch import ModelArch, ModelLoadError
from inferstack.engine.models.contract import CausalLM
from inferstack.engine.models.registry import family_for
from inferstack.engine.tokenizer import Tokenizer
from inferstack.engine.weights.location import model_name, resolve_model_path
from inferstack.engine.weights.quant_loader import (
    QuantOptions,
    QuantSummary,
    cached_projections,
    install_quantized,
)
from inferstack.engine.weights.quantize import QUANTIZATIONS
from inferstack.engine.weights.safetensors import SafetensorsCheckpoint, read_hf_config, safetensors_files

log = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights we need (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    arch: ModelArch
    tokenizer: Tokenizer
    name: str
    model_digest: str
    weight_files: list[Path]
    dtype: torch.dtype                  # activations and KV cache
    quant: QuantSummary | None = None   # None: dense weights in ``dtype``

    @property
    def kv_key_dtype(self) -> str:
        """The dtype part of the KV key space: quantized weights give different KV for the same tokens."""
        name = str(self.dtype).removeprefix("torch.")
        return name if self.quant is None else f"{name}+{self.quant.quantization}"


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, else float32. With quantized weights on CPU too, activations stay
    float32 (residual stream, norms, softmax, logits) and only each matmul's input is cast to bf16
    for the int8/int4 kernels: a bf16 residual stream cost 2.5 points of top-1 agreement on the
    bundled model (docs/engine.md, "Weight formats")."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(f"dtype {resolved} is not supported; use float32, bfloat16 or float16")
    if resolved == torch.float16 and device.type == "cpu":
        raise ModelLoadError("float16 is only supported on CUDA; use float32 or bfloat16 on CPU")
    return resolved


def check_quantization(quant: QuantOptions, path: Path, device: torch.device) -> None:
    if quant.quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization {quant.quantization!r} is not supported; use {', '.join(QUANTIZATIONS)}")
    if quant.quantization == "none":
        return
    if device.type != "cpu":
        raise ModelLoadError(f"--quantization {quant.quantization} runs torch's CPU int8/int4 kernels; on "
                             f"{device.type} use --quantization none with --dtype bfloat16 or float16")
    if quant.quantization == "gguf" and path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: --quantization gguf keeps a .gguf file's own precision; for a "
                             "safetensors checkpoint use int8 or int4")
    if quant.quantization == "int4" and quant.group_size not in (32, 64, 128):
        raise ModelLoadError(f"int4 group size must be 32, 64 or 128, got {quant.group_size}")


def load_model(spec: str, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
               progress: Callable[[str], None] | None = None, quant: QuantOptions | None = None) -> LoadedModel:
    """Load ``spec`` for inference. ``progress`` receives a line before slow one-time work (GGUF
    dequantization, about 5 s for the bundled model, and quantization; later loads reuse the on-disk
    caches). ``quant`` swaps the projections for int8/int4 kernels (:mod:`.quant_loader`)."""
    path = resolve_model_path(spec)
    dev = torch.device(device)
    quant = quant or QuantOptions()
    check_quantization(quant, path, dev)
    quantized = quant.quantization != "none"
    torch_dtype = resolve_dtype(dtype, dev)
    load_dtype = torch.float32 if quantized else torch_dtype   # quantize from full precision
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be a .gguf; for safetensors pass the directory "
                                 "holding config.json")
        from inferstack.engine.weights.gguf import (
            convert_gguf,  # the gguf package is only needed here
            gguf_tensor_name,
        )

        converted = convert_gguf(path, load_dtype, progress)
        model_dir, files, source_files = converted.model_dir, converted.weight_files, [path]
        tensor_name: Callable[[str], str] = gguf_tensor_name
    else:
        model_dir = path
        files = source_files = safetensors_files(path)
        tensor_name = str
    config = read_hf_config(model_dir)
    model, arch = build_model(config, files, load_dtype, dev, source=str(path), tensor_name=tensor_name)
    digest = model_digest(source_files)
    summary = quantize_model(model, arch, quant, digest, path, torch_dtype, progress) if quantized else None
    model.init_buffers()
    tokenizer = Tokenizer.from_dir(model_dir, config)
    name = model_name(spec)
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, name=name, model_digest=digest,
                       weight_files=list(source_files), dtype=torch_dtype, quant=summary)


def quantize_model(model: CausalLM, arch: ModelArch, quant: QuantOptions, digest: str, path: Path,
                   act_dtype: torch.dtype, progress: Callable[[str], None] | None) -> QuantSummary:
    """Swap the fp32-loaded projections for quantized kernels, then cast the rest to ``act_dtype``."""
    def gguf_source() -> tuple[dict, dict[str, str]]:
        from inferstack.engine.weights.gguf import open_gguf
        from inferstack.engine.weights.gguf_quant import gguf_quant_weights

        return gguf_quant_weights(open_gguf(path), path)

    weights, notes = cached_projections(model, quant, digest, gguf_source if quant.quantization == "gguf" else None,
                                        progress)
    summary = install_quantized(model, weights, quant, act_dtype)
    summary.notes = notes
    model.to(act_dtype)
    arch.finalize(act_dtype)
    # A decode step reads the packed weights (the embedding lookup reads one row per token).
    arch.weight_bytes_per_step = summary.quantized_bytes
    for line in summary.log_lines():
        log.info("%s", line)
    return summary


def load_tokenizer(spec: str) -> Tokenizer:
    """Only the tokenizer of a model reference (no weights are read or dequantized)."""
    path = resolve_model_path(spec)
    if path.is_file():
        from inferstack.engine.weights.gguf import convert_gguf_metadata

        model_dir = convert_gguf_metadata(path)
    else:
        model_dir = path
    return Tokenizer.from_dir(model_dir, read_hf_config(model_dir))


def build_model(config: dict[str, Any], files: list[Path], dtype: torch.dtype, device: torch.device,
                source: str, tensor_name: Callable[[str], str] = str) -> tuple[CausalLM, ModelArch]:
    architecture, family = family_for(config, source)
    arch = family.to_arch(config, architecture, source).finalize(dtype)
    with torch.device("meta"):
        model = family.model_class(arch)
    model = allocate(model.to(dtype=dtype), device)
    fill_weights(model, SafetensorsCheckpoint(files), source, tensor_name)
    return model.eval(), arch


def allocate(model: CausalLM, device: torch.device) -> CausalLM:
    """``model.to_empty(device=device)`` without importing sympy: ``to_empty`` allocates with
    ``torch.empty_like`` of each meta tensor, whose meta path imports ``torch.fx.experimental.symbolic_shapes``
    and with it sympy (~0.3 CPU s of every engine start, torch 2.13). ``torch.empty`` of the same shape and
    dtype allocates the same uninitialised storage; the checkpoint fills it next."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def fill_weights(model: CausalLM, checkpoint: SafetensorsCheckpoint, source: str,
                 tensor_name: Callable[[str], str] = str) -> None:
    """Copy every checkpoint tensor into its (possibly fused) parameter slice, checking names and shapes.

    ``tensor_name`` spells a tensor the way the user's file does (GGUF names for a .gguf).
    """
    targets = model.weight_targets()
    available = checkpoint.names()
    missing = sorted(set(targets) - available)
    if missing:
        shown = ", ".join(f"{tensor_name(n)} (shape {list(targets[n].shape)})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source}: missing tensor {shown}{more}")
    tied_head = "lm_head.weight" if "lm_head.weight" not in targets else None
    unexpected = sorted(n for n in available - set(targets)
                        if n != tied_head and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(map(tensor_name, unexpected[:5]))
        shown += f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ModelLoadError(f"{source}: unexpected tensor {shown} for {model.arch.architecture} with "
                             f"{model.arch.num_layers} layers (config.json does not match the weights)")
    for name, target in targets.items():
        shape = checkpoint.shape(name)
        if shape != target.shape:
            raise ModelLoadError(f"{source}: tensor {tensor_name(name)} has shape {list(shape)}, expected "
                                 f"{list(target.shape)} from config.json")
        target.dest.copy_(checkpoint.get(name))
