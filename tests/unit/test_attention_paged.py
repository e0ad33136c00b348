"""paged_attention against a dense reference: random block tables, mixed prefill/decode, GQA."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.models_tiny import make_meta

from inferstack.engine.executor.attention import paged_attention


def reference(q_all, k_all, v_all, cached, scale):
    """Dense causal attention of the last ``len(q)`` positions over the full ``k_all``/``v_all``."""
    group = q_all.shape[1] // k_all.shape[1]
    k = k_all.repeat_interleave(group, dim=1)
    v = v_all.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q_all, k) * scale
    q_pos = torch.arange(cached, k.shape[0])[:, None]
    scores = scores[:, cached:].masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


seq_spec = st.tuples(st.integers(0, 40), st.integers(1, 12)).map(lambda t: (t[0], t[1]))


@settings(max_examples=40, deadline=None)
@given(seqs=st.lists(seq_spec, min_size=1, max_size=5), block_size=st.sampled_from([1, 4, 16]),
       heads=st.sampled_from([(4, 4), (6, 2), (9, 3), (8, 1)]), seed=st.integers(0, 2**16),
       decode_only=st.booleans())
def test_matches_dense_reference(seqs, block_size, heads, seed, decode_only):
    torch.manual_seed(seed)
    nh, nkv = heads
    hd = 8
    if decode_only:
        seqs = [(c, 1) for c, _ in seqs]
    need = [math.ceil((c + q) / block_size) for c, q in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks).tolist()  # scattered, non-contiguous blocks
    tables, i = [], 0
    for n in need:
        tables.append(perm[i:i + n])
        i += n
    cache = torch.full((2, num_blocks, block_size, nkv, hd), float("nan"))
    full = [(torch.randn(c + q, nh, hd), torch.randn(c + q, nkv, hd), torch.randn(c + q, nkv, hd)) for c, q in seqs]
    # write the already-cached context
    for (c, _), table, (_, k, v) in zip(seqs, tables, full, strict=True):
        for pos in range(c):
            blk, off = table[pos // block_size], pos % block_size
            cache[0, blk, off], cache[1, blk, off] = k[pos], v[pos]
    meta, _ = make_meta([(t, c, q) for t, (c, q) in zip(tables, seqs, strict=True)], block_size)
    q = torch.cat([f[0][c:] for f, (c, _) in zip(full, seqs, strict=True)])
    k = torch.cat([f[1][c:] for f, (c, _) in zip(full, seqs, strict=True)])
    v = torch.cat([f[2][c:] for f, (c, _) in zip(full, seqs, strict=True)])
    out = paged_attention(q, k, v, cache, meta, scale=hd ** -0.5)
    want = torch.cat([reference(qa, ka, va, c, hd ** -0.5) for (qa, ka, va), (c, _) in zip(full, seqs, strict=True)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # and the new K/V landed in the cache at their slots
    flat_k = cache[0].reshape(-1, nkv, hd)
    torch.testing.assert_close(flat_k[meta.slot_mapping], k)


def test_bfloat16_close_to_float32():
    torch.manual_seed(0)
    nh, nkv, hd, bs = 9, 3, 64, 16
    meta, _ = make_meta([([3, 1], 20, 1), ([0, 2], 17, 1)], bs)
    cache = torch.randn(2, 4, bs, nkv, hd)
    q, k, v = torch.randn(2, nh, hd), torch.randn(2, nkv, hd), torch.randn(2, nkv, hd)
    out32 = paged_attention(q, k, v, cache.clone(), meta, hd ** -0.5)
    out16 = paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cache.bfloat16(), meta, hd ** -0.5)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)


def test_bfloat16_decode_batch_matmul_path_matches_reference():
    """Decode batches of MATMUL_DECODE_MIN_BATCH or more bf16 sequences take the two-matmul path: it must
    agree with the dense float32 reference, mask each sequence's padding, and never read the NaN that
    unwritten cache memory may hold (next to a prefill chunk in the same step)."""
    from inferstack.engine.executor.attention import MATMUL_DECODE_MIN_BATCH

    torch.manual_seed(1)
    nh, nkv, hd, bs = 9, 3, 64, 4
    decodes = max(6, MATMUL_DECODE_MIN_BATCH)
    seqs = [*[(c % 23, 1) for c in range(1, 4 * decodes, 4)], (6, 5)]
    need = [math.ceil((c + q) / bs) for c, q in seqs]
    perm = torch.randperm(sum(need) + 2).tolist()
    tables = [perm[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
    cache = torch.full((2, sum(need) + 2, bs, nkv, hd), float("nan"))
    full = [(torch.randn(c + q, nh, hd), torch.randn(c + q, nkv, hd), torch.randn(c + q, nkv, hd)) for c, q in seqs]
    for (c, _), table, (_, k, v) in zip(seqs, tables, full, strict=True):
        for pos in range(c):
            cache[0, table[pos // bs], pos % bs], cache[1, table[pos // bs], pos % bs] = k[pos], v[pos]
    meta, _ = make_meta([(t, c, q) for t, (c, q) in zip(tables, seqs, strict=True)], bs)
    new = [torch.cat([f[i][c:] for f, (c, _) in zip(full, seqs, strict=True)]) for i in range(3)]
    out = paged_attention(*(x.bfloat16() for x in new), cache.bfloat16(), meta, hd ** -0.5)
    want = torch.cat([reference(qa, ka, va, c, hd ** -0.5) for (qa, ka, va), (c, _) in zip(full, seqs, strict=True)])
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    torch.testing.assert_close(out.float(), want, atol=4e-2, rtol=4e-2)


def test_wide_prefill_attends_in_float32_over_the_bf16_values():
    """``prefill_wide``: bf16 prefill chunks (one with cached context, one without) attend in float32 over the
    same rounded q/k/v and round once at the end: within one bf16 rounding of the float32 reference over those
    values, and no further from it than the bf16 flash kernel."""
    from inferstack.engine.executor.attention import paged_attention_planned, plan_attention

    torch.manual_seed(2)
    nh, nkv, hd, bs = 9, 3, 64, 4
    seqs = [(0, 37), (9, 20)]
    tables = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]]
    full = [tuple(torch.randn(c + q, h, hd).bfloat16() for h in (nh, nkv, nkv)) for c, q in seqs]
    meta, _ = make_meta([(t, c, q) for t, (c, q) in zip(tables, seqs, strict=True)], bs)
    new = [torch.cat([f[i][c:] for f, (c, _) in zip(full, seqs, strict=True)]) for i in range(3)]
    want = torch.cat([reference(*(x.float() for x in f), c, hd ** -0.5) for f, (c, _) in zip(full, seqs, strict=True)])
    errors = []
    for wide in (True, False):
        cache = torch.zeros(2, 18, bs, nkv, hd, dtype=torch.bfloat16)
        for pos in range(seqs[1][0]):
            cache[0, tables[1][pos // bs], pos % bs], cache[1, tables[1][pos // bs], pos % bs] = full[1][1][pos], \
                full[1][2][pos]
        out = paged_attention_planned(*new, cache, plan_attention(meta, prefill_wide=wide), hd ** -0.5)
        assert out.dtype == torch.bfloat16
        errors.append((out.float() - want).abs().max().item())
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    assert errors[0] <= errors[1] and errors[0] <= 2 ** -8 * want.abs().max().item(), errors


def test_model_widens_prefill_only_where_the_race_says_so(monkeypatch):
    """models/llama.py ``_prefill_wide``: float32 prefill attention only for a bf16/fp16 CPU cache whose race it
    won; a race that load disturbed twice (None) keeps bf16."""
    from types import SimpleNamespace

    from inferstack.engine.models import llama

    arch = SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    cpu = torch.device("cpu")
    for verdict, wide in ((True, True), (False, False), (None, False)):
        monkeypatch.setattr(llama, "first_is_faster", lambda first, second, repeats, v=verdict: v)
        assert llama._prefill_wide(arch, torch.bfloat16, cpu) is wide
    monkeypatch.setattr(llama, "first_is_faster", lambda *a: (_ for _ in ()).throw(AssertionError("raced")))
    assert not llama._prefill_wide(arch, torch.float32, cpu) and not llama._prefill_wide(arch, None, cpu)
