"""The Llama family: Llama 2/3, Mistral, SmolLM2, Qwen2/2.5 and Qwen3 differ only in flags.

* ``qkv_bias``: Qwen2 has biases on the Q/K/V projections.
* ``qk_norm``: Qwen3 RMS-normalises each query and key head before rotary.
* ``tie_word_embeddings``: SmolLM2 and small Qwens reuse the embedding as the LM head.

Q/K/V and gate/up projections are fused into single matmuls at load, since a CPU decode step is
dominated by per-kernel overhead, not FLOPs. Parameters use transformers' names only in
:meth:`LlamaForCausalLM.weight_targets`, the one place that maps a checkpoint onto this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferstack.engine.executor.attention import (
    AttentionPlan,
    DecodeKernel,
    KVWriter,
    paged_attention_planned,
    plan_attention,
    sdpa_chunk,
)
from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.models.arch import ModelArch
from inferstack.engine.models.contract import Projection, WeightTarget
from inferstack.engine.models.fused_decode import FusedDecode, decode_attention_kernel, kv_int8_writer
from inferstack.engine.models.layers import (
    DenseLinear,
    GatedMLP,
    NormKernel,
    Rotary,
    RotaryEmbedding,
    linear,
    norm_kernel,
    rms_norm,
)
from inferstack.engine.models.quant_linear import QuantizedLinear, first_is_faster


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.eps = arch.rms_norm_eps
        self.scale = arch.head_dim ** -0.5
        self.qkv: nn.Module = DenseLinear(arch.q_size + 2 * arch.kv_size, arch.hidden_size, bias=arch.qkv_bias)
        self.o: nn.Module = DenseLinear(arch.hidden_size, arch.q_size)
        # Qwen3: per-head RMSNorm weights for the query heads then the key heads, so one
        # normalisation covers both.
        self.qk_norm = _param(arch.num_heads + arch.num_kv_heads, arch.head_dim) if arch.qk_norm else None

    def forward(self, x: torch.Tensor, rot: Rotary, kv_cache: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        t = x.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(t, nh + 2 * nkv, hd)
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, self.eps)
        # Rotary in the tables' dtype (the model's): with quantized weights one cast of the bf16
        # projection output, instead of two hidden ones inside mixed-dtype multiplies.
        qk = rot.apply(qk)
        out = paged_attention_planned(qk[:, :nh], qk[:, nh:], v, kv_cache, plan, self.scale)
        return self.o(out.reshape(t, nh * hd))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.eps = arch.rms_norm_eps
        self.input_norm = _param(arch.hidden_size)
        self.attn = Attention(arch)
        self.post_attn_norm = _param(arch.hidden_size)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size)
        self.inner: torch.dtype | None = None   # the projections' input dtype when not the stream's
        self.wide_from: int | None = None       # from this many rows every projection takes the stream's dtype
        self.norm_kernel: NormKernel | None = None   # the C++ one-pass norm (same bits), when built

    def forward(self, x: torch.Tensor, rot: Rotary, kv_cache: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Updates the residual stream ``x`` in place (the model's own tensor from the embedding on)."""
        inner = None if self.wide_from is not None and x.shape[0] >= self.wide_from else self.inner
        h = rms_norm(x, self.input_norm, self.eps, inner, self.norm_kernel)
        x.add_(self.attn(h, rot, kv_cache, plan))
        h = rms_norm(x, self.post_attn_norm, self.eps, inner, self.norm_kernel)
        return x.add_(self.mlp(h))


def _wide_from(layer: DecoderLayer) -> int | None:
    """The fewest rows from which all of ``layer``'s projections run on fp32 copies (None: never), so its
    norms can hand them the fp32 stream as it is (``QuantizedLinear.wide_from``)."""
    projs = (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)
    rows = [p.wide_from() if isinstance(p, QuantizedLinear) else None for p in projs]
    return None if None in rows else max(r for r in rows if r is not None)


def _prefill_wide(arch: ModelArch, dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether a 128-token prefill chunk over a ``dtype`` (bf16/fp16) cache attends faster in float32 on this
    CPU, raced as the large-step kernels are (quant_linear). On the Xeon without AMX: 0.41 against 0.65 ms;
    a CPU with a fast bf16 GEMM (AMX, the AMD EPYC) can keep bf16. Load on every timing: bf16 (as before)."""
    if dtype is None or dtype == torch.float32 or device.type != "cpu":
        return False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(128, h, arch.head_dim, generator=g).to(dtype)
               for h in (arch.num_heads, arch.num_kv_heads, arch.num_kv_heads))
    scale = arch.head_dim ** -0.5
    return bool(first_is_faster(lambda: sdpa_chunk(q, k, v, scale, True), lambda: sdpa_chunk(q, k, v, scale), 7))


class LlamaForCausalLM(nn.Module):
    """Implements `CausalLM` (engine/models/contract.py)."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.embed = _param(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = _param(arch.hidden_size)
        self.lm_head: nn.Module | None = (None if arch.tie_word_embeddings
                                          else DenseLinear(arch.vocab_size, arch.hidden_size))
        self.rotary: RotaryEmbedding | None = None
        self.fused: FusedDecode | None = None   # the C++ layer loop for batch-1 decode, when built
        self.decode_kernel: DecodeKernel | None = None   # the C++ in-place decode attention, when built
        self.kv_writer: KVWriter | None = None   # the C++ int8 K/V write, when built
        self.prefill_wide = False   # prefill attention in float32 over a bf16/fp16 cache (_prefill_wide)
        self.norm_kernel: NormKernel | None = None   # the C++ one-pass norm (same bits), when built

    def init_buffers(self) -> None:
        """Compute the non-checkpoint state (rotary tables) on the parameters' device and dtype, and
        which dtype the body's projections take: bf16 for quantized ones around an fp32 stream, so
        each norm writes its output in it (models/quant_linear.py ``inner_dtype``)."""
        self.rotary = RotaryEmbedding(self.arch, self.embed.dtype, self.embed.device)
        self.norm_kernel = norm_kernel(self.embed.device)
        for layer in self.layers:
            layer.norm_kernel = self.norm_kernel
            qkv = layer.attn.qkv
            layer.inner = qkv.out_dtype if isinstance(qkv, QuantizedLinear) else None
            layer.wide_from = _wide_from(layer) if layer.inner is not None else None
        self.fused = FusedDecode.create(self)
        self.decode_kernel = decode_attention_kernel(self.embed.device)
        self.kv_writer = kv_int8_writer(self.embed.device)
        self.prefill_wide = _prefill_wide(self.arch, self.layers[0].inner if self.layers else None, self.embed.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """``input_ids``/``positions [T]`` → final hidden states ``[T, hidden]``."""
        assert self.rotary is not None, "init_buffers() was not called"
        plan = plan_attention(meta, self.decode_kernel, self.prefill_wide, self.kv_writer)
        rot = self.rotary.lookup(positions)
        x = F.embedding(input_ids, self.embed)
        if self.fused is not None and self.fused.accepts(meta, plan, kv_caches):
            x = self.fused.run(x, rot, kv_caches, plan, meta)
            return rms_norm(x, self.norm, self.arch.rms_norm_eps)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if meta.wait_for_layer is not None:    # this layer's external KV may still be landing
                meta.wait_for_layer(i)
            x = layer(x, rot, kv_cache, plan)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps, kernel=self.norm_kernel)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return linear(hidden, self.embed).float()
        return self.lm_head(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``compute_logits(hidden).argmax(dim=-1)`` where the head computes it without the logits (a quantized
        head on its int8 block copy: 64 rows x 49,152 float32 are 12.6 MB written and read again), else None."""
        return self.lm_head.argmax(hidden) if isinstance(self.lm_head, QuantizedLinear) else None

    def projections(self) -> list[Projection]:
        """Every matmul weight, for the loader's quantization pass; a tied LM head is added as a
        module of its own (the embedding table stays dense for the lookup)."""
        out = []
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out += [Projection(layer.attn, "qkv", tuple(p + f"self_attn.{n}_proj.weight" for n in "qkv")),
                    Projection(layer.attn, "o", (p + "self_attn.o_proj.weight",)),
                    Projection(layer.mlp, "gate_up", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
                    Projection(layer.mlp, "down", (p + "mlp.down_proj.weight",))]
        head = "model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight"
        return [*out, Projection(self, "lm_head", (head,))]

    def projection_weight(self, proj: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (weight, bias) behind ``proj``: the embedding table for a tied head."""
        module = getattr(proj.parent, proj.attr)
        if module is None:
            return self.embed, None
        return module.weight, module.bias

    def weight_targets(self) -> dict[str, WeightTarget]:
        """Checkpoint tensor name (transformers' naming) → where it goes in our fused parameters."""
        a = self.arch
        q, kv = a.q_size, a.kv_size
        targets: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed.data,
                                            "model.norm.weight": self.norm.data}
        if self.lm_head is not None:
            targets["lm_head.weight"] = self.lm_head.weight.data
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.attn
            targets[p + "input_layernorm.weight"] = layer.input_norm.data
            targets[p + "post_attention_layernorm.weight"] = layer.post_attn_norm.data
            for name, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)),
                               ("v_proj", slice(q + kv, q + 2 * kv))):
                targets[p + f"self_attn.{name}.weight"] = attn.qkv.weight.data[rows]
                if attn.qkv.bias is not None:
                    targets[p + f"self_attn.{name}.bias"] = attn.qkv.bias.data[rows]
            targets[p + "self_attn.o_proj.weight"] = attn.o.weight.data
            if attn.qk_norm is not None:
                targets[p + "self_attn.q_norm.weight"] = attn.qk_norm.data[:a.num_heads]
                targets[p + "self_attn.k_norm.weight"] = attn.qk_norm.data[a.num_heads:]
            inter = a.intermediate_size
            targets[p + "mlp.gate_proj.weight"] = layer.mlp.gate_up.weight.data[:inter]
            targets[p + "mlp.up_proj.weight"] = layer.mlp.gate_up.weight.data[inter:]
            targets[p + "mlp.down_proj.weight"] = layer.mlp.down.weight.data
        out = {name: WeightTarget(dest, tuple(dest.shape)) for name, dest in targets.items()}
        for name, target in out.items():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # One [head_dim] weight shared by all heads, broadcast into every head's row.
                out[name] = WeightTarget(target.dest, (a.head_dim,))
        return out
