"""The bundled SmolLM2-135M Q4_1 GGUF against transformers reading the same file."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.models_tiny import make_meta, new_kv_caches

from inferstack.engine.weights.loader import load_model, resolve_model_path

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF files

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a list in place."}],
]
RAW = ["The quick brown fox jumps over the lazy dog. 1234 + 5678 =", "Once upon a time, 🙂"]


@pytest.fixture(scope="session")
def gguf_path():
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def ref_tokenizer(gguf_path):
    """transformers' tokenizer for the file, split as llama.cpp splits this file's `tokenizer.ggml.pre`
    ("smollm"): every number character (Unicode N: "1", but also "¹", "½") on its own, then the GPT-2 regex,
    as SmolLM2's own tokenizer.json does. transformers' GGUF conversion ignores the pre-type and applies the
    GPT-2 regex alone, so " ¹" became one piece there ([3351, 134]) and two in llama.cpp and here ([216, 43183])."""
    from tokenizers import pre_tokenizers

    ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ref


@pytest.fixture(scope="session")
def ref_model(gguf_path, smollm2_gguf, hf_smollm2):
    assert gguf_path == smollm2_gguf  # the alias resolves to the file the shared reference read
    return hf_smollm2


@pytest.fixture(scope="session")
def cold_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("inferstack-cache")


@pytest.fixture(scope="session")
def ours(cold_cache):
    """Loaded once from an empty cache dir (so the cold load is measured for the cache test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFERSTACK_CACHE_DIR", str(cold_cache))
        t0 = time.perf_counter()
        lm = load_model("smollm2-135m", dtype="float32")
        lm.cold_load_s = time.perf_counter() - t0
    return lm


def logits(ours, ids, table, cached, caches) -> torch.Tensor:
    meta, positions = make_meta([(table, cached, len(ids) - cached)], 16)
    with torch.no_grad():
        return ours.model.compute_logits(ours.model(torch.tensor(ids[cached:]), positions, caches, meta))


def test_prefill_logits_match(ours, ref_model):
    ids = ours.tokenizer.encode(RAW[0])
    got = logits(ours, ids, list(range(8)), 0, new_kv_caches(ours.arch, 8, 16))
    with torch.no_grad():
        want = ref_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_paged_decode_matches_and_greedy_answer(ours, ref_model, ref_tokenizer):
    """Chat prompt prefill, then greedy decode through a non-contiguous paged cache, against one
    transformers forward over the whole final sequence."""
    text = ref_tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    ids = ours.tokenizer.encode(text)
    table, caches = [5, 2, 7, 0, 6], new_kv_caches(ours.arch, 8, 16)
    seq, steps = list(ids), []
    for _ in range(10):
        cached = len(steps) and len(seq) - 1
        step_logits = logits(ours, seq, table, cached, caches)
        steps.append(step_logits if not cached else step_logits[-1:])
        seq.append(int(step_logits[-1].argmax()))
    got = torch.cat(steps)  # prompt rows then one row per decode step
    with torch.no_grad():
        want = ref_model(torch.tensor([seq[:-1]])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ours.tokenizer.decode(seq[len(ids):]).startswith("The capital of France is Paris")


def test_tokenizer_ids_match_transformers(ours, ref_tokenizer):
    texts = ["Hello, world!", "  two  spaces\tand tabs\n\n\r\nnewlines ", "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
             "日本語のテキスト、中文", "مرحبا بالعالم", "e\u0301 combining, ß, ﬁ ligature",
             "def f(x):\n    return [i**2 for i in range(10)]  # squares", "2024-11-27 12:34:56 and 3.14159",
             "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>text after", "I'm sure they'll say we've won",
             "$1,000.00 + 5% = ???", "\x00\x01 control \x7f", "x ¹ ² ½ Ⅻ", ""]
    for text in texts:
        ids = ours.tokenizer.encode(text)
        assert ids == ref_tokenizer.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids) == ref_tokenizer.decode(ids, skip_special_tokens=True)
        assert ours.tokenizer.decode(ids, False) == ref_tokenizer.decode(ids, skip_special_tokens=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_tokenizer_random_text_matches_transformers(ours, ref_tokenizer, text):
    assert ours.tokenizer.encode(text) == ref_tokenizer.encode(text, add_special_tokens=False)


def test_chat_template_matches_transformers(ours, ref_tokenizer):
    conversations = [*PROMPTS, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                {"role": "user", "content": "Bye 🙂"}]]
    for messages in conversations:
        for gen in (True, False):
            assert ours.tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == \
                ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.tokenizer.eos_token_ids == {ref_tokenizer.eos_token_id}
    assert ours.tokenizer.bos_token_id == ref_tokenizer.bos_token_id


def test_arch_and_identity(ours):
    a = ours.arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (30, 576, 9, 3, 64)
    assert a.tie_word_embeddings and a.rope_theta == 100000.0 and a.vocab_size == 49152
    assert a.num_params == 134_515_008  # transformers reports 134.5M for this file
    assert ours.name == "smollm2-135m" and len(ours.model_digest) == 64


def test_dequant_cache_makes_reload_fast(ours, cold_cache, monkeypatch):
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(cold_cache))
    t0 = time.perf_counter()
    again = load_model("smollm2-135m", dtype="float32")
    warm = time.perf_counter() - t0
    print(f"cold load {ours.cold_load_s:.2f}s, cached load {warm:.2f}s")
    assert warm < 0.6 * ours.cold_load_s
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
