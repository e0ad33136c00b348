"""Batch-1 decode with the decoder layers in C++ (``csrc/decode_layers.cpp``), when it is built.

Profiling a batch-1 int4 decode step of SmolLM2-135M showed about 40 % of the body's CPU time outside
the int4 matmuls, most of it the Python interpreter around ~40 small ops per layer × 30 layers
(docs/engine.md, "How a decode step runs"). The extension computes what the Python layer loop
computes: the same ATen calls for the int4 matmuls, plain loops over reused buffers for everything
between them (norms, rotary and the cache write, attention read in place from the paged cache, SiLU,
residual adds). Sums run in their own order, so the logits match the Python loop's to bf16-activation
noise and the greedy tokens up to near ties (tested). Everything else of the step (embedding, attention
plan, final norm, LM head, sampling) stays in Python.

It is part of the engine's extension (``extension.py``: built once, ahead of time, by this module's
``--build``, which ``scripts/setup.sh`` runs). The engine never compiles: without a matching build it runs
the Python loop, which is also the path for every step the extension does not cover (more than one
row, int8 or dense projections, a quantized KV cache, Qwen3's q/k norms, layer-by-layer KV waits).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from inferstack.engine.executor.attention import AttentionPlan, DecodeKernel, KVWriter
from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.models.extension import (
    ISA_DEFINES,
    ISA_ENV,
    build,
    build_dir,
    extension_name,
    isa_variant,
    load_extension,
)
from inferstack.engine.models.layers import Rotary
from inferstack.engine.models.quant_linear import QuantizedLinear, use_dense

if TYPE_CHECKING:   # llama.py imports this module
    from inferstack.engine.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class FusedDecode:
    """The model's tensors in the extension's order, gathered once at load."""

    ext: ModuleType
    weights: list[torch.Tensor]     # 10 per layer (see decode_layers.cpp)
    groups: list[int]               # 4 per layer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float

    @classmethod
    def create(cls, model: LlamaForCausalLM) -> FusedDecode | None:
        """None when the model is not the case the extension implements (every projection int4 without
        bias, bf16 between the norms, a float32 stream, no q/k norms, CPU) or the extension is not built."""
        if model.embed.dtype != torch.float32 or model.embed.device.type != "cpu":
            return None
        weights: list[torch.Tensor] = []
        groups: list[int] = []
        for layer in model.layers:
            projs = (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)
            if layer.attn.qk_norm is not None or layer.inner != torch.bfloat16 or not all(map(_int4, projs)):
                return None
            weights += [layer.input_norm.data, layer.post_attn_norm.data]
            for p in projs:
                weights += [p.packed.data, p.packed.scales]
                groups.append(p.packed.group)
        ext = load_extension()
        if ext is None:
            log.info("batch-1 decode runs the Python layer loop: the C++ decode layers are not built "
                     "(python -m inferstack.engine.models.fused_decode --build)")
            return None
        log.info("batch-1 decode runs the C++ decode layers (%s)", ext.__name__)
        first = model.layers[0]
        return cls(ext, weights, groups, first.attn.num_heads, first.attn.num_kv_heads, first.attn.head_dim,
                   first.mlp.intermediate, first.eps, first.attn.scale)

    def accepts(self, meta: AttentionMetadata, plan: AttentionPlan, kv_caches: list[torch.Tensor]) -> bool:
        """A single-sequence decode step over a plain bf16 cache, with every layer's KV already local."""
        fmt = plan.kv_format
        return (plan.num_tokens == 1 and plan.decode_slots is not None and not plan.prefills
                and meta.wait_for_layer is None and kv_caches[0].dtype == torch.bfloat16
                and (fmt is None or (fmt.compute == torch.bfloat16 and not fmt.quantized)))

    def run(self, x: torch.Tensor, rot: Rotary, kv_caches: list[torch.Tensor], plan: AttentionPlan,
            meta: AttentionMetadata) -> torch.Tensor:
        """Every decoder layer over ``x [1, hidden]`` (updated in place), as ``DecoderLayer`` would. The
        context is the first ``seq_lens_list[0]`` of the plan's decode slots (the rest pads the last block),
        the new token's slot the last of them."""
        assert plan.decode_slots is not None
        return self.ext.decode_layers(x, self.weights, self.groups, kv_caches, rot.cos.view(-1),
                                      rot.signed_sin.view(-1), plan.decode_slots,
                                      meta.seq_lens_list[0], self.num_heads, self.num_kv_heads, self.head_dim,
                                      self.intermediate, self.eps, self.scale)

def decode_attention_kernel(device: torch.device) -> DecodeKernel | None:
    """The extension's in-place decode attention for a model on ``device`` (CPU only), None when not built."""
    ext = load_extension() if device.type == "cpu" else None
    return None if ext is None else ext.paged_decode_attention


def kv_int8_writer(device: torch.device) -> KVWriter | None:
    """The extension's one-pass int8 K/V write for a model on ``device`` (CPU only), None when not built."""
    ext = load_extension() if device.type == "cpu" else None
    return None if ext is None else ext.kv_int8_write


def _int4(p: torch.nn.Module) -> bool:
    return (isinstance(p, QuantizedLinear) and p.packed.kind == "int4" and p.bias_ is None
            and p.out_dtype == torch.bfloat16 and not use_dense(1, p.crossover))


def main() -> None:
    ap = argparse.ArgumentParser(description="Build or check the C++ batch-1 decode extension (needs g++ and "
                                 "ninja). The engine uses it when built and runs its Python loop otherwise.")
    ap.add_argument("--build", action="store_true", help="compile it into the cache folder if not there yet")
    ap.add_argument("--isa", choices=sorted(ISA_DEFINES), default=None,
                    help=f"a build for one instruction set only, as a CPU without the wider ones runs it (tests; "
                         f"default ${ISA_ENV}, else the normal build with every variant)")
    args = ap.parse_args()
    isa = isa_variant(args.isa)
    if args.build and load_extension(isa) is None:
        print(f"built {build(isa=isa)}")
    built = "built" if load_extension(isa) is not None else "not built"
    print(f"{extension_name(isa)}: {built} ({build_dir(isa)})")


if __name__ == "__main__":
    main()
