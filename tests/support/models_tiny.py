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
