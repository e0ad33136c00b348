"""Deterministic prompt text whose token count is known without a tokenizer.

The vocabulary holds common English words that are each a single token (with their leading space) in
the bundled SmolLM2 tokenizer and in other byte-level BPE vocabularies, so `n` words ≈ `n` tokens.
Servers report exact counts in `usage`, which is what the metrics use.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.resources import files

import numpy as np


@lru_cache(maxsize=1)
def vocabulary() -> np.ndarray:
    words = files("inferstack.bench").joinpath("words.txt").read_text().split()
    return np.array(words, dtype=object)


def key_seed(*parts: object) -> int:
    """A stable 64-bit seed from any key (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def words(n: int, rng: np.random.Generator) -> str:
    return words_of(word_indices(n, rng))


def word_indices(n: int, rng: np.random.Generator) -> np.ndarray:
    """The vocabulary indices of the `n` words `words(n, rng)` draws (the same draws)."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    return rng.integers(0, len(vocabulary()), n)


def words_of(indices: np.ndarray) -> str:
    # join a list, not the object array: str.join copies a non-list into a list item by item first
    return " ".join(word_list(indices)) if len(indices) else ""


def word_list(indices: np.ndarray) -> list[str]:
    """The words at ``indices`` (the vocabulary's own string objects)."""
    return vocabulary()[indices].tolist() if len(indices) else []


def keyed_words(n: int, *key: object) -> str:
    """The first `n` words of the text stream named by `key`: equal keys give equal prefixes."""
    return words(n, np.random.default_rng(key_seed(*key)))
