"""The C++ batch-1 decode layers (engine/models/fused_decode.py) against the Python layer loop on the
bundled SmolLM2 GGUF: the same logits bit for bit, and the Python loop whenever the extension is not
built or the step is not the case it implements."""

from __future__ import annotations

import os

import pytest
import torch

from inferstack.engine.llm import LLM
from inferstack.engine.models import fused_decode
from inferstack.engine.models.fused_decode import FusedDecode
from inferstack.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    if fused_decode.load_extension() is None:
        why = "the decode extension is not built (python -m inferstack.engine.models.fused_decode --build; " \
              "scripts/setup.sh runs it)"
        if os.environ.get("INFERSTACK_REQUIRE_DECODE_EXTENSION"):   # CI: setup.sh must have built it
            pytest.fail(why)
        pytest.skip(why)
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
    model.fused = None if fused is None else _Counting(fused, calls)
    try:
        results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    finally:
        del model.compute_logits
        model.fused = fused
    return [r.outputs[0].token_ids for r in results], logits, calls[0]


class _Counting:
    def __init__(self, fused: FusedDecode, calls: list[int]) -> None:
        self.fused, self.calls, self.accepts = fused, calls, fused.accepts

    def run(self, *args) -> torch.Tensor:
        self.calls[0] += 1
        return self.fused.run(*args)


def test_batch1_decode_is_bit_identical_to_the_python_layers(llm):
    fused = llm.engine.core.executor.lm.model.fused
    assert fused is not None
    prompt = ["The history of the printing press began"]
    tokens, logits, calls = _run(llm, prompt, fused, 24)
    want_tokens, want_logits, _ = _run(llm, prompt, None, 24)
    assert calls == 23                       # every decode step; the prompt's prefill stays in Python
    assert tokens == want_tokens
    assert len(logits) == len(want_logits) == 24
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))


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
    assert fused_decode.load_extension() is None
    try:
        model.init_buffers()
        assert model.fused is None
        assert not any(tmp_path.iterdir())
    finally:
        monkeypatch.undo()
        model.init_buffers()
    assert model.fused is not None
