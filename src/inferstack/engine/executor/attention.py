"""Paged attention in plain torch (CPU and CUDA, no custom kernels).

Each layer's KV cache is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``. One call writes
the step's new K/V at ``meta.slot_mapping`` and attends every sequence's new tokens over its whole
context. The way tokens are grouped is planned once per step (:func:`plan_attention`) and reused by
every layer, because it depends only on the metadata:

* sequences with one new token (decode) are attended together: their context is gathered through
  the block tables into one padded ``[B, num_kv_heads, L, head_dim]`` tensor and attended with one
  batched SDPA call under a length mask — no Python loop per sequence. The gather copies one
  ``head_dim`` row per (sequence, KV head, position), so its result is already in the layout SDPA
  reads fastest; gathering whole ``[num_kv_heads * head_dim]`` slots instead leaves a strided
  ``[B, L, num_kv_heads, head_dim]`` view that makes both the copy and SDPA slower;
* on CPU, when the engine's C++ extension is built, decode sequences skip that gather instead: its
  ``paged_decode_attention`` reads each sequence's rows in place through the block tables
  (``models/csrc/paged_attention.cpp``). :func:`decode_kernel_accepts` says which caches it covers (plain
  float32/bf16/fp16 and the int8/fp8 formats); anything else, CUDA included, takes the gather above;
* sequences with several new tokens (prefill chunks) get one SDPA call each, causal with the
  diagonal offset by the tokens already cached; a chunk with no cached context skips the gather. With
  ``prefill_wide`` (where the model measured it faster, ``models/llama.py``) a bf16/fp16 chunk attends in
  float32 over the same rounded values: torch 2.13's CPU flash kernel in bf16 took 0.65 ms against 0.41 ms
  in float32 for a 128-token SmolLM2 chunk on the Xeon without AMX (1 thread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.executor.kv_format import KVFormat

# Decode batches from this many sequences attend with plain matmuls instead of SDPA when the cache
# reads back as bf16/fp16 on CPU (_decode_matmul); measured crossover 4 (2: SDPA 58 µs vs 74 µs; 4: 107 vs 89).
MATMUL_DECODE_MIN_BATCH = 4

# The extension's paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, codes) -> out.
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, str], torch.Tensor]
# The extension's kv_int8_write(x [T, kv_heads, head_dim], cache half [slots, kv_heads * row], slots [T]).
KVWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class _Prefill:
    start: int                       # first row of this sequence in the flat batch
    end: int
    context_slots: torch.Tensor | None  # [seq_len] cache slots of the whole context; None: nothing cached


@dataclass
class AttentionPlan:
    num_tokens: int
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None     # rows of decode tokens; None when every row is one
    decode_slots: torch.Tensor | None    # [B_d * L] cache slots, padded per sequence to L
    decode_mask: torch.Tensor | None     # [B_d, 1, 1, L] True where the slot holds context
    decode_len: int
    prefills: list[_Prefill]
    # Per-head row indices for the decode gather and its K/V targets, made by the first layer and
    # reused by the others (they depend only on the plan and the cache shape): a fresh
    # multi-megabyte tensor per layer costs more in page faults than the copy itself.
    decode_head_rows: torch.Tensor | None = None
    decode_buffer: torch.Tensor | None = None    # [2, B_d * num_kv_heads * L, row]: keys, values
    decode_bias: torch.Tensor | None = None      # [B_d, 1, 1, L]: decode_mask as 0 / -inf, made by layer 0
    kv_format: KVFormat | None = None    # None: the cache holds the activations as they are
    decode_kernel: DecodeKernel | None = None   # the C++ in-place decode attention, when built (CPU)
    decode_tables: torch.Tensor | None = None   # [B_d, n_blocks] block tables of the decode sequences
    decode_lens: torch.Tensor | None = None     # [B_d] their context lengths
    prefill_wide: bool = False          # prefill chunks attend in float32 (see the module docstring)
    kv_writer: KVWriter | None = None   # the C++ int8 K/V write, when built (CPU; _write)


def plan_attention(meta: AttentionMetadata, decode_kernel: DecodeKernel | None = None,
                   prefill_wide: bool = False, kv_writer: KVWriter | None = None) -> AttentionPlan:
    """``decode_kernel``: the extension's in-place decode attention, used where
    :func:`decode_kernel_accepts` says it applies; ``prefill_wide``: prefill chunks in float32; ``kv_writer``:
    the extension's int8 K/V write (:func:`_write`)."""
    device = meta.slot_mapping.device
    bs = meta.block_size
    decode_seqs: list[int] = []
    decode_starts: list[int] = []
    prefills: list[_Prefill] = []
    start = 0
    for b, (q_len, s_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list, strict=True)):
        if q_len == 1:
            decode_seqs.append(b)
            decode_starts.append(start)
        elif q_len > 1:
            slots = None
            if s_len > q_len:
                n_blocks = -(-s_len // bs)
                blocks = meta.block_tables[b, :n_blocks]
                slots = (blocks[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:s_len]
            prefills.append(_Prefill(start, start + q_len, slots))
        start += q_len

    decode_rows = decode_slots = decode_mask = tables = lens = None
    decode_len = 0
    if decode_seqs:
        all_decode = len(decode_seqs) == meta.num_seqs
        idx = None if all_decode else torch.tensor(decode_seqs, device=device)
        max_len = max(meta.seq_lens_list[b] for b in decode_seqs)
        n_blocks = -(-max_len // bs)
        decode_len = n_blocks * bs
        tables = meta.block_tables[:, :n_blocks] if idx is None else meta.block_tables[idx, :n_blocks]
        slots = (tables[:, :, None] * bs + torch.arange(bs, device=device)).reshape(len(decode_seqs), -1)
        lens = meta.seq_lens if idx is None else meta.seq_lens[idx]
        valid = torch.arange(decode_len, device=device)[None, :] < lens[:, None]
        if not all_decode:
            decode_rows = torch.tensor(decode_starts, device=device)
        current = meta.slot_mapping if decode_rows is None else meta.slot_mapping[decode_rows]
        # Padding reads the token's own (just written) slot: unwritten cache memory may hold NaN,
        # and a masked-out NaN value still poisons the weighted sum.
        decode_slots = torch.where(valid, slots, current[:, None]).reshape(-1)
        decode_mask = valid[:, None, None, :]
    return AttentionPlan(start, meta.slot_mapping, decode_rows, decode_slots, decode_mask, decode_len, prefills,
                         kv_format=meta.kv_format, decode_kernel=decode_kernel,
                         decode_tables=None if tables is None else tables.contiguous(), decode_lens=lens,
                         prefill_wide=prefill_wide, kv_writer=kv_writer)


def _store(x: torch.Tensor, fmt: KVFormat | None, storage: torch.dtype) -> torch.Tensor:
    if fmt is None:
        x = x.reshape(x.shape[0], -1)
        return x if x.dtype == storage else x.to(storage)
    return fmt.encode(x)


def _write(half: torch.Tensor, x: torch.Tensor, fmt: KVFormat | None, plan: AttentionPlan) -> None:
    """The step's K or V rows ``x [T, kv_heads, head_dim]`` into one half of the cache at their slots. An int8 cache
    on CPU takes them in one C++ pass where built (``plan.kv_writer``: the bytes of ``KVFormat.encode``, ~10 torch
    ops and a copy before: 62 us per 64 rows, twice per layer); anything else is encoded, then copied."""
    if plan.kv_writer is not None and fmt is not None and fmt.name == "int8" and x.is_cpu and half.is_cpu:
        plan.kv_writer(x, half, plan.slot_mapping)
    else:
        half.index_copy_(0, plan.slot_mapping, _store(x, fmt, half.dtype))


def _load(rows: torch.Tensor, fmt: KVFormat | None) -> torch.Tensor:
    """Cache rows ``[..., row]`` → ``[..., head_dim]`` activations."""
    return rows if fmt is None else fmt.decode(rows)


def paged_attention_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                            plan: AttentionPlan, scale: float) -> torch.Tensor:
    """``q [T, nh, hd]``, ``k``/``v [T, nkv, hd]`` → ``[T, nh, hd]`` in the format's compute dtype (the
    cache's dtype without a format); see the module docstring."""
    _, num_kv_heads, head_dim = k.shape
    fmt = plan.kv_format
    compute = kv_cache.dtype if fmt is None else fmt.compute
    if q.dtype != compute:
        q = q.to(compute)
    # Rows of num_kv_heads * head_dim: index ops on 2-D rows are plain row copies, several times
    # faster on CPU than the same ops on a 3-D view.
    cache = kv_cache.view(2, -1, num_kv_heads * kv_cache.shape[-1])
    k_cache, v_cache = cache[0], cache[1]
    _write(k_cache, k, fmt, plan)
    _write(v_cache, v, fmt, plan)

    if plan.decode_slots is not None and not plan.prefills and plan.decode_rows is None:
        return _decode(q, kv_cache, plan, scale)

    out = torch.empty_like(q)
    fresh = _fresh_inputs(q, k, v, compute, plan) if any(p.context_slots is None for p in plan.prefills) else None
    for p in plan.prefills:
        qs = q[p.start:p.end]
        if fresh is not None and p.context_slots is None:
            fq, fk, fv = fresh
            out[p.start:p.end] = sdpa_chunk(fq[p.start:p.end], fk[p.start:p.end], fv[p.start:p.end], scale,
                                            plan.prefill_wide)
        else:
            ctx, row = (-1, num_kv_heads, head_dim), kv_cache.shape[-1]
            keys = _load(k_cache.index_select(0, p.context_slots).view(-1, row), fmt).view(ctx)
            values = _load(v_cache.index_select(0, p.context_slots).view(-1, row), fmt).view(ctx)
            out[p.start:p.end] = sdpa_chunk(qs, keys, values, scale, plan.prefill_wide)
    if plan.decode_slots is not None:
        rows = plan.decode_rows
        out[rows] = _decode(q.index_select(0, rows), kv_cache, plan, scale)
    return out


def _fresh_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compute: torch.dtype,
                  plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's q/k/v as the chunks with no cached context attend them: k/v rounded to ``compute``, all three
    widened to float32 with ``prefill_wide``. Converted once for the whole step, the same values as each
    chunk's own conversions (64 chunks of 128 tokens: six small copies per chunk and layer before)."""
    k, v = k.to(compute), v.to(compute)
    if plan.prefill_wide and compute != torch.float32:
        return q.float(), k.float(), v.float()
    return q, k, v


def decode_kernel_accepts(q: torch.Tensor, kv_cache: torch.Tensor, fmt: KVFormat | None) -> bool:
    """Whether the C++ decode attention covers this step: a CPU cache that is float32, the queries' own
    dtype or an int8/fp8 format, whole KV-head groups of at most 16 heads, head_dim up to 256."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    plain = kv_cache.dtype in (torch.float32, q.dtype) and kv_cache.shape[-1] == head_dim
    return (q.is_cpu and kv_cache.is_cpu and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (plain if fmt is None or not fmt.quantized else fmt.name in ("int8", "fp8_e4m3"))
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 16 and head_dim <= 256)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    fmt = plan.kv_format
    if plan.decode_kernel is not None and decode_kernel_accepts(q, kv_cache, fmt):
        codes = fmt.name if fmt is not None and fmt.quantized else ""
        return plan.decode_kernel(q.contiguous(), kv_cache, plan.decode_tables, plan.decode_lens, scale, codes)
    return _decode_gathered(q, kv_cache, plan, scale)


def _decode_gathered(q: torch.Tensor, kv_cache: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    _, _, _, num_kv_heads, row = kv_cache.shape
    group = num_heads // num_kv_heads
    length = plan.decode_len
    # The cache seen as [2, slots * num_kv_heads, row]: row ``slot * num_kv_heads + h`` of each half is
    # head h of that slot, so one gather over dim 1 fetches keys and values together.
    heads = kv_cache.view(2, -1, row)
    compute = kv_cache.dtype if plan.kv_format is None else plan.kv_format.compute
    matmul = batch >= MATMUL_DECODE_MIN_BATCH and compute in (torch.bfloat16, torch.float16) and q.is_cpu
    head_rows, buffer, bias = decode_gather_inputs(plan, kv_cache, batch, torch.float32 if matmul else q.dtype)
    kv = _load(torch.index_select(heads, 1, head_rows, out=buffer), plan.kv_format)
    kv = kv.view(2, batch, num_kv_heads, length, head_dim)
    # Query heads sharing a KV head become rows of one [group, L] score matrix: no KV repeat needed.
    q = q.view(batch, num_kv_heads, group, head_dim)
    if matmul:
        out = _decode_matmul(q, kv, bias, scale)
    else:
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def decode_gather_inputs(plan: AttentionPlan, kv_cache: torch.Tensor, batch: int, bias_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode gather's row indices and target buffer and the additive mask, made by the step's first
    layer and kept on the plan for the others."""
    _, _, _, num_kv_heads, row = kv_cache.shape
    length = plan.decode_len
    if plan.decode_head_rows is None:
        # Ordered [B, num_kv_heads, L] so the gather lands head-major.
        kv_heads = torch.arange(num_kv_heads, device=kv_cache.device)
        plan.decode_head_rows = (plan.decode_slots.view(batch, 1, length) * num_kv_heads
                                 + kv_heads.view(1, num_kv_heads, 1)).reshape(-1)
        plan.decode_buffer = kv_cache.new_empty(2, batch * num_kv_heads * length, row)
    if plan.decode_bias is None:
        # Additive, built once per step: SDPA would turn a bool mask into this in every layer.
        plan.decode_bias = torch.zeros(plan.decode_mask.shape, dtype=bias_dtype,
                                       device=kv_cache.device).masked_fill_(~plan.decode_mask, float("-inf"))
    return plan.decode_head_rows, plan.decode_buffer, plan.decode_bias


def _decode_matmul(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention as two batched matmuls with a float32 softmax between them. torch 2.13's CPU
    flash kernel tiles queries in blocks sized for prefill, so a decode batch's ``group`` query rows
    per (sequence, KV head) leave most of each tile empty: 64 sequences × 256 positions of SmolLM2's
    layer took 7.6 ms in SDPA against 1.4 ms here (bf16, 1 thread; docs/benchmarks.md). The scores
    are rounded to bf16 once before the softmax (SDPA keeps them in float32), the same order of error
    as the bf16 queries and keys themselves; float32 caches keep SDPA (the exact parity path)."""
    scores = torch.matmul(q, kv[0].transpose(-1, -2)).float().mul_(scale).add_(bias)
    return torch.matmul(scores.softmax(-1).to(kv.dtype), kv[1])


def sdpa_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, wide: bool = False) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions of a context over all of ``k``/``v``; ``wide``: in
    float32 over the inputs' values, the result rounded back to their dtype."""
    if wide and q.dtype != torch.float32:
        return sdpa_chunk(q.float(), k.float(), v.float(), scale).to(q.dtype)
    q_len, ctx_len = q.shape[0], k.shape[0]
    if q_len == ctx_len:
        mask, causal = None, True
    else:
        mask = torch.ones(q_len, ctx_len, dtype=torch.bool, device=q.device).tril(ctx_len - q_len)
        causal = False
    # A batch dimension of one: torch's CPU flash kernel takes only 4-D inputs, and 3-D ones fall to the
    # unfused math path (a 128-token SmolLM2 prompt per layer, 1 thread: 0.85 against 1.5 ms).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V into the paged cache, then attend (plans the batch; models plan once per step)."""
    return paged_attention_planned(q, k, v, kv_cache, plan_attention(meta), scale)
