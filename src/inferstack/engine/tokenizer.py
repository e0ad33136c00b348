"""Tokenizer: the `tokenizers` library plus transformers' chat-template semantics, without transformers.

Built from an HF directory (``tokenizer.json`` + ``tokenizer_config.json``); a GGUF's tokenizer is
first converted into those files (:mod:`inferstack.engine.weights.gguf_tokenizer`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferstack.engine.models.shape import ModelLoadError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use marks standing for message text while rendering


class ChatTemplateError(ValueError):
    """The chat template is missing, or rejected the messages (``raise_exception`` in the template)."""


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, eos_token_ids: Iterable[int] = (),
                 source: str = "tokenizer") -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.source = source
        eos = set(eos_token_ids)
        eos_text = self.special_tokens.get("eos_token")
        if eos_text is not None and (eos_id := backend.token_to_id(eos_text)) is not None:
            eos.add(eos_id)
        self.eos_token_ids: set[int] = eos
        bos_text = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos_text) if bos_text is not None else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._byte_level: bool | None = None  # decided on first token_bytes() call (serializes the vocab)

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, model_dir: Path, model_config: dict[str, Any] | None = None) -> Tokenizer:
        """From an HF directory: ``tokenizer.json``, ``tokenizer_config.json`` and, when present,
        ``chat_template.jinja``/``chat_template.json`` and ``generation_config.json``."""
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir}: missing tokenizer.json (the fast-tokenizer file that "
                                 "save_pretrained writes; slow sentencepiece-only tokenizers are not supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception subclass for malformed files
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from None
        tok_config = _read_optional_json(model_dir / "tokenizer_config.json")
        special = {k: v for k in _SPECIAL_TOKEN_KEYS if (v := _token_text(tok_config.get(k))) is not None}
        eos_ids: set[int] = set()
        for cfg in (model_config or {}, _read_optional_json(model_dir / "generation_config.json")):
            eos_ids.update(_as_id_list(cfg.get("eos_token_id")))
        return cls(backend, chat_template=_find_chat_template(model_dir, tok_config), special_tokens=special,
                   eos_token_ids=eos_ids, source=str(model_dir))

    # -- ids ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               keep_special_ids: frozenset[int] = frozenset()) -> str:
        """``keep_special_ids``: special tokens written even when skipping the others (a tool-call
        marker such as Mistral's ``[TOOL_CALLS]`` that the output parser reads)."""
        if not skip_special_tokens or not keep_special_ids.intersection(ids):
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        parts, start = [], 0
        for i, token in enumerate(ids):
            if token in keep_special_ids:
                parts += [self.backend.decode(list(ids[start:i])), self.backend.id_to_token(token)]
                start = i + 1
        return "".join(parts) + self.backend.decode(list(ids[start:]))

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text``, or None when no special token is."""
        return self._special_ids.get(text)

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def id_to_token(self, token_id: int) -> str:
        """The text of one token as a user reads it (for logprobs); partial UTF-8 shows as U+FFFD."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (OpenAI's logprob ``bytes``)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:  # an embedding row past the tokenizer's vocabulary (padding): no text
            return b""
        if self._byte_level is None:
            self._byte_level = _is_byte_level(self.backend)
        if self._byte_level and self.backend.token_to_id(piece) == token_id:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return self.id_to_token(token_id).encode()

    # -- chat ---------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` as transformers' ``apply_chat_template(..., tokenize=False)`` does."""
        if not self.chat_template:
            raise ChatTemplateError(f"{self.source}: this model has no chat template (tokenizer_config.json "
                                    "'chat_template', chat_template.jinja or GGUF tokenizer.chat_template); "
                                    "use the completions API with a raw prompt instead")
        template = _compile(self.chat_template)
        context = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False, **template_kwargs: Any) -> list[int]:
        """The chat prompt's ids, with message text always tokenized as text, as OpenAI does.

        Rendering the template and tokenizing the result would turn `<|im_start|>system` typed by a
        user into the real control tokens (a forged system turn). When no message holds the text of
        a special token, that is exactly what happens (same ids as always, prefix caching unchanged);
        otherwise each message's text is spliced in as literal text between the template's tokens.
        """
        special = self._special_token_re
        if special is None or not any(special.search(str(m.get("content") or "")) for m in messages):
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_kwargs),
                               add_special_tokens)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.apply_chat_template(marked, add_generation_prompt, **template_kwargs)
        ids: list[int] = []
        for k, piece in enumerate(_MARK.split(rendered)):
            if k % 2 == 0:  # template text: its control tokens are meant
                ids += self.encode(piece, add_special_tokens and k == 0) if piece else []
            else:           # a message's text: never a control token
                ids += self._literal_backend.encode(str(messages[int(piece)].get("content") or ""),
                                                    add_special_tokens=False).ids
        return ids

    @cached_property
    def _special_token_re(self) -> re.Pattern[str] | None:
        texts = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.special},
                       key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    @cached_property
    def _literal_backend(self) -> tokenizers.Tokenizer:
        """A copy that encodes special-token text as plain text (a copy: the flag is not per call)."""
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def detokenizer(self, skip_special_tokens: bool = True,
                    keep_special_ids: frozenset[int] = frozenset()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens, keep_special_ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each step decodes a short window (from the start of the previous delta's tokens) twice — with
    and without the new tokens — and emits the difference. Text that ends in U+FFFD may be a UTF-8
    character split across tokens, so it is held back until more tokens arrive or :meth:`finish`.
    Because emitted text always ends on a complete character, the concatenation of all deltas plus
    :meth:`finish` equals ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 keep_special_ids: frozenset[int] = frozenset()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._keep = keep_special_ids
        self.ids: list[int] = []
        self._prefix = 0   # window start: first token of the last emitted delta
        self._read = 0     # tokens whose text has been emitted

    def feed(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """Emit whatever was held back (text that genuinely ends in U+FFFD or a truncated character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._tok.decode(self.ids[self._prefix:self._read], self._skip, self._keep)
        after = self._tok.decode(self.ids[self._prefix:], self._skip, self._keep)
        if len(after) <= len(before) and not final:
            return ""  # nothing visible yet (e.g. skipped special tokens or a partial character)
        if after.endswith("\ufffd") and not final:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]


# -- helpers ----------------------------------------------------------------------------------------


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _find_chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = tok_config.get("chat_template") or _read_optional_json(model_dir / "chat_template.json").get(
        "chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _is_byte_level(backend: tokenizers.Tokenizer) -> bool:
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte → printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers) renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares tags as a class attribute

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers overrides jinja's tojson: no HTML escaping, unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None
