"""Our model families against transformers on tiny random checkpoints (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch
from tests.support.models_tiny import FAMILIES, make_meta, new_kv_caches, write_tiny_model

from inferstack.engine.weights.loader import load_model

BLOCK = 4
TOL = 1e-4

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    torch.set_num_threads(1)
    model_dir = write_tiny_model(tmp_path_factory.mktemp(request.param), request.param, seed=7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return load_model(str(model_dir), dtype="float32"), ref


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n,), generator=g).tolist()


def step(lm, seqs_ids, seqs, caches):
    """One flat batch: ``seqs`` as (block_table, cached_len, query_len); returns logits per token."""
    meta, positions = make_meta(seqs, BLOCK)
    ids = torch.tensor([t for s, (_, c, q) in zip(seqs_ids, seqs, strict=True) for t in s[c:c + q]])
    with torch.no_grad():
        hidden = lm.model(ids, positions, caches, meta)
        return lm.model.compute_logits(hidden)


def test_arch_fields(tiny):
    lm, ref = tiny
    assert lm.arch.num_params == sum(p.numel() for p in ref.parameters())
    assert lm.arch.vocab_size == 320 and lm.arch.num_layers == 2
    assert lm.dtype == torch.float32 and lm.name == lm.weight_files[0].parent.name
    assert len(lm.model_digest) == 64 and lm.weight_files[0].suffix == ".safetensors"


def test_prefill_matches(tiny):
    lm, ref = tiny
    ids = prompt(13, 1)
    caches = new_kv_caches(lm.arch, 8, BLOCK)
    ours = step(lm, [ids], [([5, 2, 7, 0], 0, 13)], caches)
    torch.testing.assert_close(ours, ref_logits(ref, ids), atol=TOL, rtol=0)


def test_decode_through_noncontiguous_blocks(tiny):
    lm, ref = tiny
    ids = prompt(11, 2)
    table = [6, 1, 4]  # out of order on purpose
    caches = new_kv_caches(lm.arch, 8, BLOCK)
    expected = ref_logits(ref, ids)
    step(lm, [ids], [(table, 0, 5)], caches)               # prefill 5 tokens
    for pos in range(5, 11):                                # then one token at a time
        out = step(lm, [ids], [(table, pos, 1)], caches)
        torch.testing.assert_close(out[0], expected[pos], atol=TOL, rtol=0)


def test_mixed_batch_of_three(tiny):
    """A prefill chunk over cached context, a fresh prefill and a decode token in one flat batch."""
    lm, ref = tiny
    a, b, c = prompt(14, 3), prompt(6, 4), prompt(9, 5)
    ta, tb, tc = [9, 3, 11, 0], [2, 7], [10, 5, 1]
    caches = new_kv_caches(lm.arch, 12, BLOCK)
    step(lm, [a, c], [(ta, 0, 6), (tc, 0, 8)], caches)      # a: first chunk; c: prompt up to its last token
    out = step(lm, [a, b, c], [(ta, 6, 8), (tb, 0, 6), (tc, 8, 1)], caches)
    torch.testing.assert_close(out[:8], ref_logits(ref, a)[6:], atol=TOL, rtol=0)
    torch.testing.assert_close(out[8:14], ref_logits(ref, b), atol=TOL, rtol=0)
    torch.testing.assert_close(out[14], ref_logits(ref, c)[8], atol=TOL, rtol=0)
    # then a pure decode step for all three, with different context lengths (padded batch path)
    a2, b2, c2 = [*a, 17], [*b, 23], [*c, 31]
    out = step(lm, [a2, b2, c2], [(ta, 14, 1), (tb, 6, 1), (tc, 9, 1)], caches)
    for row, full in enumerate((a2, b2, c2)):
        torch.testing.assert_close(out[row], ref_logits(ref, full)[-1], atol=TOL, rtol=0)


def test_bfloat16_as_close_as_transformers_bfloat16(tiny):
    """bf16 rounding differs in detail, so the bar is transformers' own bf16 error against fp32."""
    lm, ref = tiny
    model_dir = lm.weight_files[0].parent
    ours16 = load_model(str(model_dir), dtype="bfloat16")
    assert ours16.dtype == torch.bfloat16 and ours16.arch.weight_bytes_per_step * 2 == lm.arch.weight_bytes_per_step
    ids = prompt(12, 9)
    caches = new_kv_caches(ours16.arch, 8, BLOCK, dtype=torch.bfloat16)
    got = step(ours16, [ids], [([4, 1, 6], 0, 12)], caches)
    assert got.dtype == torch.float32
    exact = ref_logits(ref, ids)
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    their_err = (ref_logits(ref16, ids) - exact).abs().max().item()
    assert (got - exact).abs().max().item() <= 2 * their_err + 1e-2
