"""GGUF loading on tiny files written the way llama.cpp's converter writes them."""

from __future__ import annotations

import pytest
import torch
from tests.support.models_tiny import make_meta, new_kv_caches, write_tiny_gguf, write_tiny_model

from inferstack.engine.models.arch import ModelLoadError
from inferstack.engine.weights import gguf as gguf_mod
from inferstack.engine.weights.loader import load_model, load_tokenizer

transformers = pytest.importorskip("transformers")


IDS = [5, 17, 42, 99, 3, 250, 7, 64, 1, 120]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    return tmp_path / "cache"


def our_logits(lm, ids=IDS) -> torch.Tensor:
    meta, positions = make_meta([([3, 0, 2], 0, len(ids))], 4)
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(torch.tensor(ids), positions, new_kv_caches(lm.arch, 4, 4), meta))


def ref_logits(model_dir, gguf_file=None, ids=IDS) -> torch.Tensor:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_equals_the_hf_checkpoint(tmp_path, family):
    """Exact weights: any mistake in names, Q/K un-permutation or hyper-parameters shows here."""
    hf = write_tiny_model(tmp_path / "hf", family, seed=3)
    lm = load_model(str(write_tiny_gguf(hf, tmp_path / "m.gguf", family)), dtype="float32")
    torch.testing.assert_close(our_logits(lm), ref_logits(hf), atol=1e-4, rtol=0)
    assert lm.arch.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                    "qwen3": "Qwen3ForCausalLM"}[family]
    assert lm.weight_files == [tmp_path / "m.gguf"] and lm.name == "m"


@pytest.mark.parametrize(("family", "qtype"), [("llama", "Q4_1"), ("llama", "Q8_0"), ("llama", "Q4_0"),
                                               ("qwen2", "Q5_0"), ("llama", "F16"), ("llama", "BF16")])
def test_quantized_gguf_matches_transformers_reading_the_same_file(tmp_path, family, qtype):
    hf = write_tiny_model(tmp_path / family, family, seed=4)
    path = write_tiny_gguf(hf, tmp_path / f"{family}-{qtype}.gguf", family, qtype)
    ours = our_logits(load_model(str(path), dtype="float32"))
    torch.testing.assert_close(ours, ref_logits(tmp_path, path.name), atol=1e-4, rtol=0)
    # and quantization really happened: the logits moved away from the exact checkpoint
    if qtype.startswith("Q"):
        assert (ours - ref_logits(hf)).abs().max() > 1e-3


def test_gguf_tokenizer_and_chat_template(tmp_path):
    hf = write_tiny_model(tmp_path / "hf", "llama")
    ours = load_model(str(write_tiny_gguf(hf, tmp_path / "m.gguf", "llama")))
    from_dir = load_model(str(hf)).tokenizer
    tok = ours.tokenizer
    for text in ["hello world", "the quick brown fox, jumps!", "  spaces\n\nand\ttabs  ", "déjà vu 🙂",
                 "<|im_start|>user\nhi<|im_end|>", "def main():\n    return 42"]:
        assert tok.encode(text) == from_dir.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.eos_token_ids == {from_dir.backend.token_to_id("<|im_end|>")}
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == from_dir.apply_chat_template(msgs)


def test_second_load_uses_the_dequant_cache(tmp_path, cache_dir, monkeypatch):
    hf = write_tiny_model(tmp_path / "hf", "llama")
    path = write_tiny_gguf(hf, tmp_path / "m.gguf", "llama", "Q4_1")
    first = load_model(str(path))
    cached = list((cache_dir / "gguf").glob("m-*/weights-float32.safetensors"))
    assert len(cached) == 1

    def no_reader(*_a, **_k):
        raise AssertionError("the GGUF was parsed again although its conversion is cached")

    monkeypatch.setattr(gguf_mod, "open_gguf", no_reader)
    second = load_model(str(path))
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert second.model_digest == first.model_digest
    # another dtype is another cache entry, converted from the GGUF again
    monkeypatch.undo()
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(cache_dir))
    bf16 = load_model(str(path), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert len(list((cache_dir / "gguf").glob("m-*/weights-bfloat16.safetensors"))) == 1


def test_truncated_gguf_is_named(tmp_path):
    hf = write_tiny_model(tmp_path / "hf", "llama")
    data = write_tiny_gguf(hf, tmp_path / "m.gguf", "llama", "Q8_0").read_bytes()
    for cut in (100, len(data) // 3, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=r"cut\d+\.gguf: GGUF file is truncated or corrupt"):
            load_model(str(bad))
    other = tmp_path / "not.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(other))


def test_unknown_gguf_architecture(tmp_path):
    hf = write_tiny_model(tmp_path / "hf", "llama")
    path = write_tiny_gguf(hf, tmp_path / "m.gguf", "falcon")
    with pytest.raises(ModelLoadError, match=r"unknown architecture 'falcon'.*supported: llama, qwen2, qwen3"):
        load_model(str(path))


def test_missing_gguf_tensor_uses_gguf_names(tmp_path):
    import gguf

    hf = write_tiny_model(tmp_path / "hf", "llama")
    full = gguf.GGUFReader(write_tiny_gguf(hf, tmp_path / "full.gguf", "llama"))
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for field in full.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0],
                            field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in full.tensors:
        if t.name != "blk.1.ffn_down.weight":
            w.add_tensor(t.name, t.data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"m\.gguf: missing tensor blk\.1\.ffn_down\.weight \(shape \[64, 96\]\)"):
        load_model(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_gguf_pre_tokenizer_matches_transformers(tmp_path, pre):
    """llama.cpp's split regex per ``tokenizer.ggml.pre``, checked against transformers' GGUF reader."""
    hf = write_tiny_model(tmp_path / "hf", "llama")
    path = write_tiny_gguf(hf, tmp_path / f"{pre}.gguf", "llama", pre=pre)
    ours = load_tokenizer(str(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world, the fox's 12345 tokens!", "  def main():\n\n    return 42\r\n", "don't STOP 99 bottles",
                 "über café 🙂", "a\tb   c"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_sentencepiece_gguf_tokenizer(tmp_path):
    """A sentencepiece ("llama") vocabulary goes through transformers' converter; BOS is added on request."""
    import gguf
    import numpy as np

    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "▁hello", "▁w", "or", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_tokenizer(str(tmp_path / "spm.gguf"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", " hello  world", "héllo"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False))
    assert ours.encode("héllo")[1:3] == [3 + 0xC3, 3 + 0xA9]  # byte fallback for the missing "é"
    assert ours.eos_token_ids == {2} and ours.bos_token_id == 1
