"""Tiny random HF checkpoints (Llama, Mistral, Qwen2, Qwen3) and paged-attention metadata for tests.

Checkpoints are written by transformers' ``save_pretrained`` (safetensors) with a small byte-level
BPE ``tokenizer.json`` trained here, so they look exactly like a real HF model directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from inferstack.engine.executor.attention_metadata import AttentionMetadata

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=MODEL_VOCAB, max_position_embeddings=256,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(cls="LlamaConfig", rope_theta=10000.0, tie_word_embeddings=False),
    "llama3": dict(cls="LlamaConfig", rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(cls="MistralConfig", rope_theta=1e6, sliding_window=4096, tie_word_embeddings=False),
    "qwen2": dict(cls="Qwen2Config", rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(cls="Qwen3Config", rope_theta=1e6, head_dim=32, tie_word_embeddings=False),
}


def train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens",
              "def main():\n    return 42", "paged attention over blocks of the cache"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_tiny_model(out_dir: Path, family: str, seed: int = 0) -> Path:
    """Save a seeded random ``family`` model with tokenizer files into ``out_dir``; return it."""
    import transformers

    spec = dict(FAMILIES[family])
    config = getattr(transformers, spec.pop("cls"))(**_COMMON, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so a wrong mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    train_tokenizer().save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    return out_dir


def make_meta(seqs: list[tuple[list[int], int, int]], block_size: int,
              device: str | torch.device = "cpu") -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for sequences given as ``(block_table, cached_len, query_len)``; also returns positions."""
    slots: list[int] = []
    positions: list[int] = []
    qsl = [0]
    for table, cached, q_len in seqs:
        for pos in range(cached, cached + q_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        qsl.append(qsl[-1] + q_len)
    width = max(len(t) for t, _, _ in seqs)
    tables = [t + [0] * (width - len(t)) for t, _, _ in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=device),
        seq_lens=torch.tensor([c + q for _, c, q in seqs], dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
        query_lens_list=[q for _, _, q in seqs],
        seq_lens_list=[c + q for _, c, q in seqs],
        block_size=block_size,
    )
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


def new_kv_caches(arch: Any, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> list[torch.Tensor]:
    # NaN-filled, so reading a slot that was never written poisons the result instead of passing.
    shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(arch.num_layers)]


_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(w: Any, n_head: int) -> Any:
    # What llama.cpp's convert_hf_to_gguf does to Llama Q/K rows (its rotary pairs adjacent dims).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: Path, out: Path, arch: str, qtype: str = "F32", pre: str = "gpt2") -> Path:
    """Write the HF checkpoint in ``hf_dir`` as a GGUF the way llama.cpp's converter lays it out.

    2-D weights use ``qtype`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...); norms stay F32 as in llama.cpp.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(config.get("head_dim") or config["hidden_size"] // heads)
    w.add_value_length(config.get("head_dim") or config["hidden_size"] // heads)
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    # llama.cpp pads the vocabulary to the embedding's rows with unused placeholder tokens.
    pad = [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens + pad)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens] + [5] * len(pad))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for name, arr in tensors.items():
        if name.startswith("model.layers."):
            idx, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{idx}.{_GGUF_LAYER_NAMES[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                arr = _llama_cpp_permute(arr, heads)
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                arr = _llama_cpp_permute(arr, kv_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
