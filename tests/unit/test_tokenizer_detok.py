"""Tokenizer behaviour without transformers: incremental detokenization, chat templates, token bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tests.support.models_tiny import train_tokenizer

from inferstack.engine.tokenizer import ChatTemplateError, Tokenizer
from inferstack.engine.weights.loader import load_tokenizer


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer(train_tokenizer(), special_tokens={"eos_token": "</s>"})


def detokenize(tok: Tokenizer, ids: list[int], chunks: list[int], skip: bool) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip)
    deltas, i = [], 0
    for n in chunks:
        deltas.append(detok.feed(ids[i:i + n]))
        i += n
    deltas.append(detok.feed(ids[i:]))
    deltas.append(detok.finish())
    return deltas


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=40), chunks=st.lists(st.integers(1, 4), max_size=40),
       skip=st.booleans())
def test_incremental_equals_full_decode_random_ids(smol, ids, chunks, skip):
    """Random ids include lone UTF-8 continuation bytes, partial emoji and special tokens."""
    deltas = detokenize(smol, ids, chunks, skip)
    assert "".join(deltas) == smol.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), chunks=st.lists(st.integers(1, 3), max_size=60))
def test_incremental_never_emits_a_broken_character(smol, text, chunks):
    ids = smol.encode(text)
    # SmolLM2's vocabulary lacks a few byte tokens (e.g. 0xF1), so rare planes do not round-trip.
    assume(smol.decode(ids) == text)
    deltas = detokenize(smol, ids, chunks, skip=True)
    assert "".join(deltas) == text
    # a delta never ends with a replacement character the full text does not have there
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_emoji_split_over_byte_tokens_is_held_back(smol):
    ids = smol.encode("ok 👍🏽!")
    detok = smol.detokenizer()
    deltas = [detok.feed([i]) for i in ids] + [detok.finish()]
    assert "".join(deltas) == "ok 👍🏽!"
    assert all(not d.endswith("\ufffd") for d in deltas)
    assert len(ids) > 4  # the emoji really spans several byte tokens


@given(ids=st.lists(st.integers(0, 299), max_size=30), chunks=st.lists(st.integers(1, 5), max_size=30))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_incremental_tiny_tokenizer(tiny, ids, chunks):
    assert "".join(detokenize(tiny, ids, chunks, skip=True)) == tiny.decode(ids)


def test_token_bytes_and_text(smol):
    ids = smol.encode("é🙂 x")
    assert b"".join(smol.token_bytes(i) for i in ids) == "é🙂 x".encode()
    assert smol.id_to_token(smol.encode(" hello")[0]) == " hello"
    assert smol.id_to_token(2) == "<|im_end|>"


def test_special_ids(smol):
    assert smol.eos_token_ids == {2} and smol.bos_token_id == 1 and smol.vocab_size == 49152


def test_chat_template_features(tiny):
    template = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% if tools %}T{% endif %}{{ strftime_now('%Y') | length }}"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    tok = Tokenizer(tiny.backend, chat_template=template, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert tok.apply_chat_template([{"role": "user", "content": "é<b>"}]) == '<s>"é<b>"4</s>'
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tiny.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_cannot_escape_the_sandbox(tiny):
    tok = Tokenizer(tiny.backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match=r"unsafe|access"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
