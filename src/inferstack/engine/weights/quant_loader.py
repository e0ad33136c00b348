"""The loader's quantization pass: dense checkpoint weights → int8/int4 projections.

1. Each projection (fused Q/K/V, O, gate/up, down, LM head) gets a host-independent
   :data:`QuantWeight`, cached on disk per model digest, format and group
   (``$INFERSTACK_CACHE_DIR/quant/``), like the GGUF dequantization cache: a later load skips the
   conversion.
2. It is packed for this host's kernels (never cached: the int4 layout depends on the CPU) and
   swapped in as a :class:`QuantizedLinear`; the fp32 checkpoint copy is dropped.
3. With ``dense_prefill`` a bf16 copy stays too, for steps of ``crossover`` rows or more, where a
   bf16 GEMM beats the GEMV-shaped quantized kernels (docs/engine.md, "Weight formats").

Formats: ``int8`` per group of ``group_size`` columns, symmetric or min/max over 255 steps, whichever
is closer to the tensor (per output row only where a shape does not fit the grouped kernel); ``int4``
groups of ``group_size`` columns; ``gguf`` keeps the file's own precision
(:mod:`inferstack.engine.weights.gguf_quant`). The LM head is int8 with a scale (and an offset where
that is closer) per 32 columns in every format, as llama.cpp's Q4 files keep it at Q6_K/Q8_0: it
decides every token, and per-row int8 there cost 3-4 points of top-1 agreement on SmolLM2. On the
bundled model (Q4_1 body, Q8_0 head) each grid holds one of them exactly; per-row int8 everywhere
measured 97.2 % top-1 against fp32 (docs/engine.md, "Weight formats").
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from inferstack.engine.models.contract import Projection
from inferstack.engine.models.int8_blocks import available
from inferstack.engine.models.quant_linear import (
    QuantizedLinear,
    inner_dtype,
    large_step_kernel,
    measure_crossover,
)
from inferstack.engine.weights.gguf import save_safetensors_atomic
from inferstack.engine.weights.quantize import (
    Int4Weight,
    Int8Weight,
    QuantWeight,
    concat_rows,
    int4_group_for,
    quantize_int4,
    quantize_int8,
    quantize_int8_grouped,
)
from inferstack.paths import cache_root

log = logging.getLogger(__name__)
CACHE_VERSION = 4


@dataclass(frozen=True)
class QuantOptions:
    quantization: str = "none"          # none | int8 | int4 | gguf
    group_size: int = 32                # int8/int4 group (32, 64 or 128)
    dense_prefill: bool = True          # keep a bf16 copy for large steps
    crossover_rows: int | None = None   # rows from which the bf16 copy is used; None: measure
    large_kernel: str = "auto"          # the large-step copy: bfloat16 | float32 | int8 | int8blk | auto


_COPY_NAMES = {"bfloat16": "bf16", "float32": "fp32", "int8blk": "int8 block codes (VNNI int8 × int8 GEMM)"}


@dataclass
class QuantSummary:
    quantization: str
    formats: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    quantized_bytes: int = 0
    dense_bytes: int = 0
    crossover: dict[str, int | None] = field(default_factory=dict)
    large_kernel: str = "bfloat16"      # the copy: bfloat16 / float32 (F.linear), int8 / int8blk (int8 GEMMs)

    def log_lines(self) -> list[str]:
        mib = 2 ** 20
        formats = ", ".join(f"{n} × {f}" for f, n in sorted(self.formats.items()))
        copy = _COPY_NAMES.get(self.large_kernel, "int8 (per channel, int8 × int8 GEMM)")
        dense = (f"; {copy} copy for large steps {self.dense_bytes / mib:.0f} MiB (--no-dense-prefill drops it)"
                 if self.dense_bytes else "; no large-step copy: every step uses the quantized kernels")
        lines = [f"quantization {self.quantization}: {formats}; quantized weights "
                 f"{self.quantized_bytes / mib:.0f} MiB{dense}"]
        if self.crossover:
            gemm = {"bfloat16": "bf16 GEMM", "float32": "fp32 GEMM", "int8blk": "int8 block GEMM"}.get(
                self.large_kernel, "int8 GEMM")
            lines.append(f"kernel choice: {gemm} from " + ", ".join(
                f"{rows} rows for {kind}" if rows else f"never for {kind}"
                for kind, rows in sorted(self.crossover.items())))
        return lines + self.notes


def _kind(w: QuantWeight) -> str:
    name = "int8" if isinstance(w, Int8Weight) else "int4"
    return f"{name} g{w.group}" if w.group else name


def _fits_kernel(w: QuantWeight) -> bool:
    """torch's int4 packing (also behind grouped int8) needs N divisible by 16."""
    return (isinstance(w, Int8Weight) and not w.group) or w.shape[0] % 16 == 0


def _from_dense(dense: torch.Tensor, want_int4: bool, group_size: int) -> tuple[QuantWeight, str | None]:
    group = int4_group_for(dense.shape[1], group_size)
    if group and dense.shape[0] % 16 == 0:
        note = None if group == group_size else f"group {group} (the width {dense.shape[1]} is not a " \
                                                f"multiple of {group_size})"
        return (quantize_int4(dense, group) if want_int4 else quantize_int8_grouped(dense, group)), note
    return quantize_int8(dense), f"int8 per row: shape {list(dense.shape)} does not fit the grouped kernel"


def convert_projections(model: nn.Module, opts: QuantOptions,
                        source: dict[str, QuantWeight] | None) -> tuple[dict[str, QuantWeight], list[str]]:
    """One QuantWeight per projection (keyed by its fused checkpoint names) plus notes for the log."""
    out: dict[str, QuantWeight] = {}
    notes: list[str] = []
    projections = model.projections()
    for proj in projections:
        key = "+".join(proj.parts)
        dense, _ = model.projection_weight(proj)
        is_head = proj is projections[-1]
        if source is not None:
            fused = concat_rows([source[p] for p in proj.parts])
            if fused is None or not _fits_kernel(fused):
                fused = quantize_int8(dense)
                notes.append(f"{key}: parts in different formats or an odd shape; requantized to int8")
            out[key] = fused
            continue
        if is_head and dense.shape[1] % 32 == 0 and dense.shape[0] % 16 == 0:
            out[key] = quantize_int8_grouped(dense, 32)    # every token's choice: 8 bits, a scale per 32
            continue
        weight, note = _from_dense(dense, opts.quantization == "int4", opts.group_size)
        out[key] = weight
        if note:
            notes.append(f"{key}: {note}")
    return out, notes


def cache_path(digest: str, opts: QuantOptions) -> Path:
    group = f"-g{opts.group_size}" if opts.quantization in ("int4", "int8") else ""
    return cache_root() / "quant" / f"{digest[:16]}-{opts.quantization}{group}-v{CACHE_VERSION}.safetensors"


def save_cache(path: Path, weights: dict[str, QuantWeight], notes: list[str]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for key, w in weights.items():
        if isinstance(w, Int8Weight):
            tensors |= {f"{key}/q": w.q, f"{key}/scale": w.scale}
            if w.offset is not None:
                tensors[f"{key}/offset"] = w.offset
            meta[key] = {"kind": "int8", "exact": w.exact, "group": w.group, "offset": w.offset is not None}
        else:
            tensors |= {f"{key}/codes": w.codes, f"{key}/scale": w.scale, f"{key}/min": w.minimum}
            meta[key] = {"kind": "int4", "group": w.group, "exact": w.exact}
    save_safetensors_atomic({k: t.contiguous() for k, t in tensors.items()}, path,
                            {"weights": json.dumps(meta), "notes": json.dumps(notes)})


def load_cache(path: Path) -> tuple[dict[str, QuantWeight], list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = f.metadata()
        meta, notes = json.loads(header["weights"]), json.loads(header["notes"])

        def get(name: str) -> torch.Tensor:
            return f.get_tensor(name).clone()   # own the memory: the file's mapping closes with ``f``

        out: dict[str, QuantWeight] = {}
        for key, m in meta.items():
            if m["kind"] == "int8":
                out[key] = Int8Weight(get(f"{key}/q"), get(f"{key}/scale"), m["exact"], m["group"],
                                      get(f"{key}/offset") if m["offset"] else None)
            else:
                out[key] = Int4Weight(get(f"{key}/codes"), get(f"{key}/scale"), get(f"{key}/min"), m["group"],
                                      m["exact"])
    return out, notes


def cached_projections(model: nn.Module, opts: QuantOptions, digest: str,
                       gguf_source: Callable[[], tuple[dict[str, QuantWeight], dict[str, str]]] | None,
                       progress: Callable[[str], None] | None = None) -> tuple[dict[str, QuantWeight], list[str]]:
    """The converted projections from the cache, converting (and caching) them on first use."""
    path = cache_path(digest, opts)
    if path.exists():
        try:
            return load_cache(path)
        except Exception as e:  # a corrupt cache file is rebuilt, never fatal
            log.warning("quantization cache %s is unreadable (%s); converting again", path, e)
    if progress:
        progress(f"quantizing to {opts.quantization} (once; cached in {path})")
    source, how = gguf_source() if gguf_source else (None, {})
    weights, notes = convert_projections(model, opts, source)
    notes = [f"{n} tensors {conversion}" for conversion, n in sorted(Counter(how.values()).items())] + notes
    save_cache(path, weights, notes)
    return weights, notes


def install_quantized(model: nn.Module, weights: dict[str, QuantWeight], opts: QuantOptions,
                      act_dtype: torch.dtype) -> QuantSummary:
    """Swap every projection for its packed kernel (plus the bf16 copy when kept). The body's
    projections return :func:`inner_dtype`, the LM head ``act_dtype``."""
    summary = QuantSummary(opts.quantization)
    if opts.dense_prefill:
        summary.large_kernel = _large_kernel(model, weights, opts)
        summary.crossover = _crossovers(model, weights, opts, summary.large_kernel)
    for proj in model.projections():
        w = weights["+".join(proj.parts)]
        dense, bias = model.projection_weight(proj)
        kind = _kind(w)
        out_dtype = act_dtype if proj.attr == "lm_head" else inner_dtype(act_dtype)
        layer = QuantizedLinear.build(w, dense if opts.dense_prefill else None, bias,
                                      summary.crossover.get(kind.split()[0]), out_dtype, summary.large_kernel)
        setattr(proj.parent, proj.attr, layer)
        summary.formats[kind] += 1
        quantized, dense_bytes = layer.memory()
        summary.quantized_bytes += quantized
        summary.dense_bytes += dense_bytes
    return summary


def _gate_up_probe(model: nn.Module) -> Projection:
    return next(p for p in model.projections() if p.attr == "gate_up")


def _large_kernel(model: nn.Module, weights: dict[str, QuantWeight], opts: QuantOptions) -> str:
    """The large-step copy's format: the user's, or the fastest at 64 rows on layer 0's gate/up weight
    (~0.3 s) of bf16, fp32 and, where its accuracy meets the format's floor, the int8 block kernel.

    The block kernel rounds each activation to int8 per 32 columns: top-1 agreement 96.4 % with the bundled
    Q4_1 GGUF's own fp32 weights (``tests/integration/test_quantized_real_model.py``), above issue 14's
    int4 floor (95 %), below its int8 floor (99 %). So ``auto`` races it only for a GGUF whose projections
    are all 4-bit (its LM head may be Q8_0); ``--quant-large-kernel int8blk`` asks for it anywhere."""
    if opts.large_kernel == "int8blk" and available() is None:
        log.warning("--quant-large-kernel int8blk: this CPU has no AVX-512 VNNI or the engine's extension is not "
                    "built; the large-step copy is fp32")
        return "float32"
    if opts.large_kernel != "auto":
        return opts.large_kernel
    probe = _gate_up_probe(model)
    four_bit = opts.quantization == "gguf" and all(
        isinstance(weights["+".join(p.parts)], Int4Weight) for p in model.projections() if p.attr != "lm_head")
    blocks = weights["+".join(probe.parts)] if four_bit else None
    return large_step_kernel(model.projection_weight(probe)[0], blocks=blocks)


def _crossovers(model: nn.Module, weights: dict[str, QuantWeight], opts: QuantOptions,
                large: str) -> dict[str, int | None]:
    """Per kernel kind, the rows from which the large-step copy is used: the user's, or measured now on
    layer 0's gate/up weight (~0.5 s)."""
    kinds = {_kind(w).split()[0] for w in weights.values()}
    if opts.crossover_rows is not None:
        return dict.fromkeys(kinds, opts.crossover_rows)
    dense = model.projection_weight(_gate_up_probe(model))[0]
    found: dict[str, int | None] = {}
    for kind in sorted(kinds):
        group = int4_group_for(dense.shape[1], opts.group_size) or 32
        sample = quantize_int8_grouped(dense, group) if kind == "int8" else quantize_int4(dense, group)
        found[kind] = measure_crossover(sample, large=large)
    return found
