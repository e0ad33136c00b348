"""Facts about a model read from its own files, for the ModelPack config and the ML-BOM.

GGUF: the `general.*` metadata and tensor types. Hugging Face folders: `config.json` and the
safetensors headers (parameter count without loading any tensor).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_DTYPE_PRECISION = {
    "F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "I8": "int8", "U8": "uint8",
    "F8_E4M3": "fp8", "F8_E5M2": "fp8", "I32": "int32", "I64": "int64",
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
}


@dataclass
class ModelInfo:
    name: str
    format: str
    architecture: str | None = None
    param_count: int | None = None
    precision: str | None = None
    quantization: str | None = None
    family: str | None = None
    licenses: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    task: str = "text-generation"

    @property
    def param_size(self) -> str | None:
        return format_param_count(self.param_count) if self.param_count else None


def format_param_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return str(n)


def read_model_info(weight_files: list[Path], root: Path, name: str) -> ModelInfo:
    """Inspect the weight files (and config.json beside them) of one model."""
    ggufs = [p for p in weight_files if p.suffix == ".gguf"]
    if ggufs:
        return _gguf_info(ggufs[0], name)
    safetensors = [p for p in weight_files if p.suffix == ".safetensors"]
    info = ModelInfo(name=name, format="safetensors" if safetensors else _format_of(weight_files))
    config = root / "config.json"
    if config.is_file():
        _apply_hf_config(info, json.loads(config.read_text()))
    if safetensors:
        count, dtypes = _safetensors_stats(safetensors)
        info.param_count = count
        if info.precision is None and dtypes:
            info.precision = _DTYPE_PRECISION.get(dtypes.most_common(1)[0][0])
    return info


def _format_of(files: list[Path]) -> str:
    suffixes = {p.suffix for p in files}
    if suffixes & {".bin", ".pt", ".pth", ".ckpt"}:
        return "pytorch"
    if ".onnx" in suffixes:
        return "onnx"
    return next(iter(sorted(suffixes)), "unknown").lstrip(".") or "unknown"


def _apply_hf_config(info: ModelInfo, cfg: dict) -> None:
    info.architecture = cfg.get("model_type") or (cfg.get("architectures") or [None])[0]
    info.family = cfg.get("model_type")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(dtype, str):
        info.precision = _DTYPE_PRECISION.get(dtype, dtype)
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method") or "unknown"
        bits = quant.get("bits")
        info.quantization = f"{method}-{bits}bit" if bits else str(method)


def _safetensors_stats(files: list[Path]) -> tuple[int, Counter[str]]:
    total = 0
    dtypes: Counter[str] = Counter()
    for path in files:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100 * 1024 * 1024:
                raise ValueError(f"{path.name}: safetensors header of {header_len} bytes is not plausible")
            header = json.loads(f.read(header_len))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for dim in meta["shape"]:
                n *= int(dim)
            total += n
            dtypes[meta["dtype"]] += n
    return total, dtypes


def _gguf_info(path: Path, name: str) -> ModelInfo:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field_value(key: str) -> object | None:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = field_value("general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    info = ModelInfo(
        name=str(field_value("general.basename") or name),
        format="gguf",
        architecture=str(arch) if arch else None,
        param_count=sum(int(t.n_elements) for t in reader.tensors),
        family=str(field_value("general.basename") or arch or "") or None,
    )
    license_ = field_value("general.license")
    if license_:
        info.licenses = [str(license_)]
    langs = field_value("general.languages")
    if isinstance(langs, list):
        info.languages = [str(x) for x in langs]
    file_type = field_value("general.file_type")
    dominant = types.most_common(1)[0][0] if types else None
    if file_type is not None:
        try:
            ftype = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
        except ValueError:
            ftype = dominant or "unknown"
    else:
        ftype = dominant or "unknown"
    if ftype in ("F32", "F16", "BF16", "ALL_F32"):
        info.precision = _DTYPE_PRECISION.get(ftype.replace("ALL_", ""), ftype.lower())
    else:
        info.quantization = f"gguf-{ftype.lower()}"
        info.precision = _gguf_precision(ftype)
    return info


def _gguf_precision(ftype: str) -> str:
    for bits in ("2", "3", "4", "5", "6", "8"):
        if ftype.startswith(f"Q{bits}") or ftype.startswith(f"IQ{bits}"):
            return f"int{bits}"
    return ftype.lower()
