"""Prompt token ids for simulated requests.

`bundled` renders chat messages with the bundled model's chat template and tokenizer, exactly as an
emulated engine does (`engine serve --emulate`), so prompt lengths and KV block hashes match it token
for token; it costs ~0.1-1 ms per request. `words` maps each word of the workload's text (whose
vocabulary words are one token each, `bench/textgen.py`) to a fixed id and adds the chat template's
per-message overhead; it is ~20x cheaper and keeps prefix sharing exact, for large runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np

from inferstack.bench.textgen import vocabulary
from inferstack.bench.workloads import Message, RequestSpec

TOKENIZERS = ("words", "bundled")
# Per-message template tokens of ChatML-style templates (`<|im_start|>role\n ... <|im_end|>\n`).
_ROLE_IDS = {"system": (1, 9, 198), "user": (1, 10, 198), "assistant": (1, 11, 198)}
_END = (2, 198)
_TAIL = (*_END, *_ROLE_IDS["assistant"])     # what follows a one-message prompt's words
_WORD_BASE = 1000
_OUTPUT_IDS = tuple(range(500, 564))


class PromptTokens(Protocol):
    name: str

    def encode(self, messages: Sequence[Message]) -> list[int]: ...

    def encode_request(self, spec: RequestSpec) -> list[int]:
        """``encode(spec.messages)``, faster where the workload gave the words' vocabulary indices."""
        ...

    def output_ids(self) -> list[int]: ...


@lru_cache(maxsize=1)
def _word_ids() -> dict[str, int]:
    return {w: _WORD_BASE + i for i, w in enumerate(vocabulary())}


@lru_cache(maxsize=1)
def _id_objects() -> np.ndarray:
    """Word i's token id at index i, as shared int objects: a prompt's ids are looked up, not created (a thousand
    new ints per request, each kept as long as the request lives, cost more than the lookup)."""
    return np.array([_WORD_BASE + i for i in range(len(vocabulary()))], dtype=object)


class WordTokens:
    name = "words"

    def __init__(self) -> None:
        self._ids = _word_ids()
        self._unknown = _WORD_BASE + len(self._ids)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        ids: list[int] = []
        lookup, get, unknown = self._ids.__getitem__, self._ids.get, self._unknown
        for role, text in messages:
            ids += _ROLE_IDS.get(role, _ROLE_IDS["user"])
            words, start = text.split(), len(ids)
            try:      # workload text is all vocabulary words: map at C speed, per word only on a miss
                ids += map(lookup, words)
            except KeyError:
                del ids[start:]        # `+=` keeps what it mapped before the miss
                ids += [get(w, unknown) for w in words]
            ids += _END
        ids += _ROLE_IDS["assistant"]
        return ids

    def encode_request(self, spec: RequestSpec) -> list[int]:
        if spec.word_ids is None or len(spec.messages) != 1:
            return self.encode(spec.messages)
        # the vocabulary's words are distinct, so word i of the vocabulary is id _WORD_BASE + i (`_word_ids`)
        ids: list[int] = _id_objects()[spec.word_ids].tolist()
        ids[:0] = _ROLE_IDS.get(spec.messages[0][0], _ROLE_IDS["user"])
        ids += _TAIL
        return ids

    def output_ids(self) -> list[int]:
        return list(_OUTPUT_IDS)


class BundledTokens:
    name = "bundled"

    def __init__(self) -> None:
        from inferstack.engine.executor.emulated import bundled_tokenizer, output_ids

        self._tok = bundled_tokenizer()
        self._out = output_ids(self._tok)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        text = self._tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                             add_generation_prompt=True)
        return self._tok.encode(text, add_special_tokens=False)

    def encode_request(self, spec: RequestSpec) -> list[int]:
        return self.encode(spec.messages)

    def output_ids(self) -> list[int]:
        return list(self._out)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self._tok.eos_token_ids)


def prompt_tokens(name: str) -> PromptTokens:
    if name == "words":
        return WordTokens()
    if name == "bundled":
        return BundledTokens()
    raise ValueError(f"unknown tokenizer {name!r}; use {' or '.join(TOKENIZERS)}")
