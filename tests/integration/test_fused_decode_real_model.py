"""The engine's C++ extension (engine/models/extension.py). The batch-1 decode layers (fused_decode.py)
against the Python layer loop on the bundled SmolLM2 GGUF: the same greedy tokens and logits within
bf16-activation noise, and the Python loop whenever the extension is not built or the step is not the
case it implements. The grouped-int8 kernel (csrc/q8_matmul.cpp) in every vector width this CPU runs,
and as the model's Q8_0 LM head, against the dequantized product.

The comparisons run for the normal build and for the builds for one instruction set (``avx2``,
``baseline``: the attention clone and int8 kernel a CPU without AVX-512, or without AVX2, runs), which
this test compiles into the cache folder when they are not there (~40 CPU-s each, once)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from types import ModuleType

import pytest
import torch

from inferstack.engine.llm import LLM
from inferstack.engine.models import extension
from inferstack.engine.models.fused_decode import FusedDecode
from inferstack.engine.models.quant_linear import QuantizedLinear
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.weights.quantize import Int8Weight

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["", "avx2", "baseline"], ids=["normal", "avx2", "baseline"])
def variant(request, ext) -> ModuleType:
    """The extension built for ``request.param`` ("" the engine's own), compiled here when missing."""
    isa = request.param
    module = extension.load_extension(isa)
    if module is None:
        if shutil.which("g++") is None or shutil.which("ninja") is None:
            if os.environ.get("INFERSTACK_REQUIRE_DECODE_EXTENSION"):
                pytest.fail(f"the {isa} build needs g++ and ninja")
            pytest.skip(f"the {isa} build needs g++ and ninja")
        extension.build(isa=isa)
        module = extension.load_extension(isa)
    assert module is not None
    assert module.q8_isa(32) == {"": module.q8_isa(32), "avx2": "avx2", "baseline": "scalar"}[isa]
    assert not (isa and module.int8_blocks_supported())    # no AVX-512 VNNI kernel in a one-ISA build
    return module


@pytest.fixture(scope="module")
def llm(ext):
    return LLM("smollm2-135m", quantization="gguf", num_threads=1, kv_cache_bytes=64 << 20,
               max_model_len=512, max_num_seqs=16)   # the batch cap two threads gave (8 per thread)


def _run(llm: LLM, prompts: list[str], fused: FusedDecode | None, max_tokens: int
         ) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy outputs, every step's logits and how many steps took the C++ layers (``fused`` None:
    the Python loop)."""
    model = llm.engine.core.executor.lm.model
    logits: list[torch.Tensor] = []
    calls = [0]
    compute_logits = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        logits.append(compute_logits(hidden))
        return logits[-1]

    model.compute_logits = recording
    own = model.fused
    model.fused = None if fused is None else _Counting(fused, calls)
    try:
        results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    finally:
        del model.compute_logits
        model.fused = own
    return [r.outputs[0].token_ids for r in results], logits, calls[0]


class _Counting:
    def __init__(self, fused: FusedDecode, calls: list[int]) -> None:
        self.fused, self.calls, self.accepts = fused, calls, fused.accepts

    def run(self, *args) -> torch.Tensor:
        self.calls[0] += 1
        return self.fused.run(*args)


def test_batch1_decode_matches_the_python_layers(llm, variant):
    """The C++ glue sums in its own order and keeps attention scores in float32, so its logits are the
    Python loop's within bf16-activation noise (measured 0.1-0.5 on logits of magnitude 15-40), not bit
    for bit. Greedy tokens are identical until a step where the Python loop's top two logits are closer
    than that noise (a near tie may flip; the contexts differ from there on); a wrong slot, head or
    rounding diverges at once and by whole units. Every build: each runs its own attention clone."""
    fused = llm.engine.core.executor.lm.model.fused
    assert fused is not None
    fused = dataclasses.replace(fused, ext=variant)
    prompt = ["The history of the printing press began"]
    tokens, logits, calls = _run(llm, prompt, fused, 40)
    want_tokens, want_logits, _ = _run(llm, prompt, None, 40)
    assert calls == 39                       # every decode step; the prompt's prefill stays in Python
    assert torch.equal(logits[0], want_logits[0])    # the prefill's, from the same Python code
    same = next((i for i, (a, b) in enumerate(zip(tokens[0], want_tokens[0], strict=True)) if a != b), 40)
    assert same >= 4
    diffs = [(a - b).abs().max().item() for a, b in zip(logits, want_logits, strict=True)][:same + 1]
    assert 0 < max(diffs) < 1.0, diffs
    if same < 40:
        top2 = want_logits[same][0].topk(2).values
        assert (top2[0] - top2[1]).item() < 2 * diffs[same], (same, top2, diffs[same])


def test_batched_decode_keeps_the_python_layers(llm):
    """Two sequences decoding together: the step has two rows, so the existing batched path runs."""
    fused = llm.engine.core.executor.lm.model.fused
    prompts = ["Water boils at", "The capital of France is"]
    tokens, _, calls = _run(llm, prompts, fused, 6)
    want, _, _ = _run(llm, prompts, None, 6)
    assert calls == 0 and tokens == want


def test_without_a_build_the_model_keeps_the_python_layers(llm, tmp_path, monkeypatch):
    """A fresh cache folder holds no build: loading finds none and never compiles one."""
    model = llm.engine.core.executor.lm.model
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(tmp_path))
    assert extension.load_extension() is None
    try:
        model.init_buffers()
        assert model.fused is None
        assert not any(tmp_path.iterdir())
    finally:
        monkeypatch.undo()
        model.init_buffers()
    assert model.fused is not None


def _isas(ext: ModuleType, group: int) -> list[str]:
    """The kernel's vector widths this CPU runs at ``group``: the widest, and every narrower one."""
    order = ["avx512", "avx2", "scalar"]
    return order[order.index(ext.q8_isa(group)):]


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_q8_matmul_is_the_dequantized_product(variant, group, asymmetric):
    """Every vector width, 1 to 6 activation rows (blocks of 4 and a remainder), a row count that is
    not a multiple of the 16-row tile, with and without per-group offsets: float32 sums of exact
    products, so within float32 rounding of the float64 product, and a row's result the same bits
    alone as in a batch. Every build: one for fewer
    instruction sets picks its own widest and refuses the wider ones."""
    ext = variant
    gen = torch.Generator().manual_seed(group + asymmetric)
    n, k = 203, 4 * group
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=gen).half().float() / 64     # Q8_0: fp16 scales
    offset = torch.randn(n, k // group, generator=gen) / 8 if asymmetric else None
    want_w = Int8Weight(q, scale, group=group, offset=offset).dequantize().double()
    for rows in (1, 3, 6):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        want = x.double() @ want_w.t()
        for isa in _isas(ext, group):
            got = ext.q8_matmul(x, q, scale, torch.empty(0) if offset is None else offset, group, isa)
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            err = (got.double() - want).abs().max().item()
            assert err < 2e-6 * want.abs().max().item(), (isa, rows, err)
            # One row alone (the batch-1 head's interleaved, prefetching loop on AVX-512) sums in the
            # multi-row loop's order: the same bits.
            one = ext.q8_matmul(x[-1:], q, scale, torch.empty(0) if offset is None else offset, group, isa)
            assert torch.equal(one[0], got[-1]), (isa, rows)
    if ext.q8_isa(group) != "avx512":
        with pytest.raises(RuntimeError, match="cannot run 'avx512'"):
            ext.q8_matmul(x, q, scale, torch.empty(0), group, "avx512")
    with pytest.raises(RuntimeError, match="multiple of the group size"):
        ext.q8_matmul(x[:, :-1], q[:, :-1].contiguous(), scale, torch.empty(0), group)


def test_the_q8_0_head_runs_in_one_pass_with_exact_scales(llm, ext, variant):
    """The bundled GGUF's Q8_0 LM head is the C++ kernel's (kind int8g), and its logits for a real hidden
    state are the dequantized head's within float32 rounding (the two-int4-plane path it replaces was
    ~0.4 % off: bf16 scales). Every build's kernel."""
    model = llm.engine.core.executor.lm.model
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.packed.kind == "int8g" and head.packed.kernel is ext
    packed = head.packed
    dequantized = Int8Weight(packed.data, packed.scales, group=packed.group).dequantize().double()
    hidden = model.embed[[17, 2004, 9000]]        # three real rows of the model's scale
    # One row per call, as at batch 1 (from the start-up crossover on the head runs its bf16 copy).
    packed.kernel = variant
    try:
        got = torch.cat([model.compute_logits(row[None]) for row in hidden])
    finally:
        packed.kernel = ext
    want = hidden.to(torch.bfloat16).double() @ dequantized.t()
    assert (got.double() - want).abs().max().item() < 2e-6 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
