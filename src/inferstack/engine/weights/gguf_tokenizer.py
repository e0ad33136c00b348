"""A GGUF's tokenizer metadata → ``tokenizer.json`` + ``tokenizer_config.json`` contents.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3, Qwen2/3) are
built directly with the ``tokenizers`` library, splitting text the way llama.cpp does for the
file's ``tokenizer.ggml.pre``. Other vocabularies (sentencepiece "llama", unigram "t5") are
converted with transformers' GGUF utilities when transformers is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from inferstack.engine.models.shape import ModelLoadError

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# llama.cpp splits every digit on its own before the GPT-2 regex for these (as their HF tokenizers do).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}


def tokenizer_files_from_gguf(reader: Any, path: Path) -> tuple[str, dict[str, Any], list[int]]:
    """``(tokenizer.json text, tokenizer_config.json dict, eos token ids)``."""
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    kind = get("tokenizer.ggml.model")
    tokens: list[str] | None = get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelLoadError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens)")
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, get("tokenizer.ggml.merges") or [], get("tokenizer.ggml.token_type"),
                                  get("tokenizer.ggml.pre"), path)
    else:
        backend = _via_transformers(path, kind)

    def token(key: str) -> str | None:
        idx = get(key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    bos = token("tokenizer.ggml.bos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos is not None:  # encode(add_special_tokens=True) prepends BOS, as llama.cpp does
        bos_id = get("tokenizer.ggml.bos_token_id")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    config: dict[str, Any] = {
        "bos_token": bos, "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"), "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos, "source": path.name,
    }
    if (template := get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    # End of generation: eos, plus llama.cpp's end-of-turn / end-of-message tokens (Llama 3's <|eot_id|>).
    eos_ids = [i for key in ("eos_token_id", "eot_token_id", "eom_token_id")
               if isinstance(i := get(f"tokenizer.ggml.{key}"), int)]
    return backend.to_str(), {k: v for k, v in config.items() if v is not None}, list(dict.fromkeys(eos_ids))


def _byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None, pre: str | None,
                    path: Path) -> Tokenizer:
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # "gpt2", "default" and anything else: the GPT-2 regex, as llama.cpp falls back to
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    types = token_types or []
    # Control tokens (<|im_end|>) and user-defined ones (<think>) must match whole, never be split;
    # a "control" token spelled outside the byte alphabet is a llama.cpp mislabel and stays plain.
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types, strict=False)
               if kind == _TOKEN_CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=False) if kind == _TOKEN_USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    return backend


def _via_transformers(path: Path, kind: str) -> Tokenizer:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:
        raise ModelLoadError(f"{path}: tokenizer type {kind!r} is converted with transformers' GGUF "
                             "utilities; pip install transformers (or use an HF directory)") from None
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    try:
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return backend
