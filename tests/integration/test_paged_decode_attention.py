"""The C++ decode attention that reads the paged KV cache in place (models/csrc/paged_attention.cpp) against
the torch path it replaces (executor/attention.py's gather + SDPA / two matmuls) and a float64 reference:
random caches, ragged lengths, scattered blocks, GQA, every cache format it covers, every build (normal,
``avx2``, ``baseline``: the AVX-512 intrinsics path and the portable clones). Then the engine on the
bundled GGUF: the kernel runs for batched decode steps, and greedy tokens match the torch path's."""

from __future__ import annotations

import os
import shutil
from types import ModuleType

import pytest
import torch

from inferstack.engine.executor import attention
from inferstack.engine.executor.attention import paged_attention_planned, plan_attention
from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.executor.kv_format import KVFormat
from inferstack.engine.llm import LLM
from inferstack.engine.models import extension
from inferstack.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

NH, NKV, HD = 9, 3, 64     # SmolLM2-135M


@pytest.fixture(scope="module", params=["", "avx2", "baseline"], ids=["normal", "avx2", "baseline"])
def variant(request) -> ModuleType:
    """The extension built for ``request.param`` ("" the engine's own), compiled here when missing."""
    isa = request.param
    module = extension.load_extension(isa)
    if module is None:
        if isa == "" or shutil.which("g++") is None or shutil.which("ninja") is None:
            why = "the decode extension is not built (python -m inferstack.engine.models.fused_decode --build)"
            if os.environ.get("INFERSTACK_REQUIRE_DECODE_EXTENSION"):
                pytest.fail(why)
            pytest.skip(why)
        extension.build(isa=isa)
        module = extension.load_extension(isa)
    assert module is not None
    return module


def _case(batch: int, block_size: int, seed: int, max_len: int = 200) -> tuple[AttentionMetadata, int]:
    """A pure-decode step: ragged lengths 1..max_len, every sequence's blocks scattered over the cache."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lens[0] = 1                                   # a context of the new token alone
    need = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need)
    tables = torch.zeros(batch, width, dtype=torch.int64)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n]
        used += n
    slots = torch.tensor([int(tables[b, (int(n) - 1) // block_size]) * block_size + (int(n) - 1) % block_size
                          for b, n in enumerate(lens)])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(batch + 1), seq_lens=lens,
                             block_tables=tables, query_lens_list=[1] * batch, seq_lens_list=lens.tolist(),
                             block_size=block_size)
    return meta, num_blocks


def _exact(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """float64 attention of each sequence's query over its context (``keys``/``values``: decoded
    [slots, nkv, hd] as the kernel reads them)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    bs, group, head_dim = meta.block_size, q.shape[1] // keys.shape[1], q.shape[2]
    for b, n in enumerate(meta.seq_lens_list):
        slots = (meta.block_tables[b, :, None] * bs + torch.arange(bs)).reshape(-1)[:n]
        k = keys[slots].double().repeat_interleave(group, 1)
        v = values[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,thd->ht", q[b].double(), k) * head_dim ** -0.5
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


# (cache format name or None for a plain cache of the compute dtype, compute dtype, tolerance relative to
# the output's largest value: the output's rounding to the compute dtype, float32 sums for float32)
FORMATS = [(None, torch.float32, 5e-6), (None, torch.bfloat16, 4e-3), (None, torch.float16, 1e-3),
           ("float32", torch.bfloat16, 4e-3), ("int8", torch.bfloat16, 4e-3), ("fp8_e4m3", torch.bfloat16, 4e-3),
           ("int8", torch.float32, 5e-6), ("fp8_e4m3", torch.float16, 1e-3)]


@pytest.mark.parametrize(("name", "compute", "tol"), FORMATS, ids=[f"{f}-{c}" for f, c, _ in FORMATS])
@pytest.mark.parametrize(("batch", "block_size"), [(1, 16), (7, 16), (64, 16), (5, 1), (6, 5)])
def test_matches_the_torch_path(variant, name, compute, tol, batch, block_size):
    """Against float64 over the values the kernel reads (quantized rows as code x scale, not rounded to the
    compute dtype as the torch path rounds them): within the output's rounding (the torch path's bf16
    matmuls also round the scores, so it is compared to ours at three times that)."""
    meta, num_blocks = _case(batch, block_size, seed=batch * 31 + block_size)
    fmt = None if name is None else KVFormat(name, compute, HD)
    meta.kv_format = fmt
    storage, row = (compute, HD) if fmt is None else (fmt.storage, fmt.row)
    gen = torch.Generator().manual_seed(batch)
    acts = torch.randn(2, num_blocks * block_size, NKV, HD, generator=gen).to(compute)
    cache = torch.empty((2, num_blocks, block_size, NKV, row), dtype=storage)
    for i in range(2):
        cache[i].view(-1, NKV * row)[:] = acts[i].reshape(-1, NKV * HD) if fmt is None else fmt.encode(acts[i])
    q = torch.randn(batch, NH, HD, generator=gen).to(compute)
    k, v = (acts[i][meta.slot_mapping] for i in range(2))     # the step's new rows: what is there already

    want = paged_attention_planned(q, k, v, cache, plan_attention(meta), HD ** -0.5)
    got = paged_attention_planned(q, k, v, cache, plan_attention(meta, variant.paged_decode_attention), HD ** -0.5)
    exact = _exact(q, *_read(cache, fmt, NKV), meta)
    assert got.dtype == compute and got.shape == (batch, NH, HD)
    top = exact.abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= tol * top, (err, top)
    torch.testing.assert_close(got.float(), want.float(), atol=3 * tol * top, rtol=0)


def _read(cache: torch.Tensor, fmt: KVFormat | None, nkv: int) -> list[torch.Tensor]:
    """Keys and values [slots, nkv, hd] as the kernel reads them: a plain row as KVFormat.decode reads it, a
    quantized one as code x scale in float32."""
    row = cache.shape[-1]
    if fmt is not None and fmt.quantized:
        fmt = KVFormat(fmt.name, torch.float32, fmt.head_dim)
    return [x.view(-1, nkv, row) if fmt is None else fmt.decode(x.view(-1, nkv, row)) for x in cache]


# Shapes beside SmolLM2's (query heads, KV heads, head_dim): head_dim 128, a group wider than the kernel's
# tile of four query heads, one KV head, no sharing. With one thread a batch of 16 is shared out by sequence
# (every KV head of it at once) and a batch of 3 by (sequence, KV head).
SHAPES = [(12, 2, 128), (8, 1, 64), (4, 4, 64)]
OTHER_FORMATS = [(None, torch.bfloat16, 4e-3), ("int8", torch.bfloat16, 4e-3), (None, torch.float32, 5e-6),
                 ("float32", torch.bfloat16, 4e-3)]


@pytest.mark.parametrize(("nh", "nkv", "hd"), SHAPES, ids=[f"{a}q{b}kv{c}" for a, b, c in SHAPES])
@pytest.mark.parametrize("batch", [3, 16])
@pytest.mark.parametrize(("name", "compute", "tol"), OTHER_FORMATS, ids=[f"{f}-{c}" for f, c, _ in OTHER_FORMATS])
def test_other_shapes_against_float64(variant, nh, nkv, hd, batch, name, compute, tol):
    meta, num_blocks = _case(batch, 16, seed=batch + nh + hd, max_len=90)
    fmt = None if name is None else KVFormat(name, compute, hd)
    storage, row = (compute, hd) if fmt is None else (fmt.storage, fmt.row)
    gen = torch.Generator().manual_seed(hd + batch)
    acts = torch.randn(2, num_blocks * 16, nkv, hd, generator=gen).to(compute)
    cache = torch.empty((2, num_blocks, 16, nkv, row), dtype=storage)
    for i in range(2):
        cache[i].view(-1, nkv * row)[:] = acts[i].reshape(-1, nkv * hd) if fmt is None else fmt.encode(acts[i])
    q = torch.randn(batch, nh, hd, generator=gen).to(compute)
    codes = fmt.name if fmt is not None and fmt.quantized else ""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = variant.paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, hd ** -0.5, codes)
    finally:
        torch.set_num_threads(threads)
    exact = _exact(q, *_read(cache, fmt, nkv), meta)
    top = exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= tol * top


def test_formats_it_does_not_cover_take_the_gather(variant, monkeypatch):
    """A float16 cache read back as bf16 (no kernel variant) and a kernel that is not there take the torch
    path; a covered one never reaches it."""
    meta, num_blocks = _case(4, 16, seed=3)
    gathered: list[int] = []
    original = attention._decode_gathered
    monkeypatch.setattr(attention, "_decode_gathered", lambda *a: gathered.append(1) or original(*a))
    fmt = KVFormat("float16", torch.bfloat16, HD)
    cache = torch.randn(2, num_blocks, 16, NKV, HD).half()
    q, k, v = torch.randn(4, NH, HD).bfloat16(), torch.randn(4, NKV, HD), torch.randn(4, NKV, HD)
    meta.kv_format = fmt
    paged_attention_planned(q, k, v, cache, plan_attention(meta, variant.paged_decode_attention), HD ** -0.5)
    assert gathered == [1]
    meta.kv_format = None
    cache = cache.bfloat16()
    paged_attention_planned(q, k, v, cache, plan_attention(meta), HD ** -0.5)
    assert gathered == [1, 1]
    paged_attention_planned(q, k, v, cache, plan_attention(meta, variant.paged_decode_attention), HD ** -0.5)
    assert gathered == [1, 1]


PROMPTS = ["Water boils at", "The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first person to walk on the Moon"]


def _generate(llm: LLM, kernel, steps: int) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy tokens of PROMPTS decoded together, every step's logits [6, vocab] (one prefill step, then one
    decode step per token: the rows are the prompts in order) and how many attention calls the kernel took;
    ``kernel`` None: the torch path."""
    model = llm.engine.core.executor.lm.model
    own, compute_logits = model.decode_kernel, model.compute_logits
    logits: list[torch.Tensor] = []
    calls = [0]

    def counting(*args):
        calls[0] += 1
        return kernel(*args)

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        logits.append(compute_logits(hidden))
        return logits[-1]

    model.decode_kernel = None if kernel is None else counting
    model.compute_logits = recording
    try:
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
        tokens = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, params)]
    finally:
        model.decode_kernel = own
        del model.compute_logits
    assert [x.shape[0] for x in logits] == [len(PROMPTS)] * steps
    return tokens, logits, calls[0]


@pytest.fixture(scope="module")
def engine_kernel(variant):
    if variant is not extension.load_extension():
        pytest.skip("the engine loads the normal build")
    return variant.paged_decode_attention


def test_float32_engine_batch_decodes_with_the_kernel_token_for_token(engine_kernel):
    """float32 weights and cache (the transformers-parity configuration): the kernel's sums differ from
    SDPA's only in float32 rounding, so six sequences decoding together give the same greedy tokens and
    logits within 1e-3; the model picked the kernel up at load and every decode step's layers call it."""
    llm = LLM("smollm2-135m", dtype="float32", num_threads=1, kv_cache_bytes=64 << 20, max_model_len=512)
    assert llm.engine.core.executor.lm.model.decode_kernel is not None
    tokens, logits, calls = _generate(llm, engine_kernel, 24)
    want_tokens, want_logits, _ = _generate(llm, None, 24)
    assert calls == 23 * 30                              # 23 decode steps x 30 layers
    assert tokens == want_tokens
    assert torch.equal(logits[0], want_logits[0])        # the prefill does not use it
    assert max((a - b).abs().max().item() for a, b in zip(logits, want_logits, strict=True)) < 1e-3


def test_gguf_engine_batch_decodes_within_bf16_noise(engine_kernel):
    """The bundled GGUF (bf16 cache): the torch path rounds its scores to bf16 before the softmax and the
    kernel does not, so logits differ by bf16-activation noise (under 1.0 on logits of magnitude 15-40) and
    a greedy token may differ only where the torch path's top two logits were closer than that."""
    llm = LLM("smollm2-135m", quantization="gguf", num_threads=1, kv_cache_bytes=64 << 20, max_model_len=512)
    tokens, logits, calls = _generate(llm, engine_kernel, 24)
    want_tokens, want_logits, _ = _generate(llm, None, 24)
    assert calls == 23 * 30
    assert torch.equal(logits[0], want_logits[0])
    for i, (got, want) in enumerate(zip(tokens, want_tokens, strict=True)):
        same = next((t for t, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(got))
        diffs = [(a[i] - b[i]).abs().max().item() for a, b in zip(logits, want_logits, strict=True)][:same + 1]
        assert max(diffs) < 1.0, (i, diffs)
        if same < len(got):
            top2 = want_logits[same][i].topk(2).values
            assert (top2[0] - top2[1]).item() < 2 * diffs[same], (i, same, top2, diffs[same])
