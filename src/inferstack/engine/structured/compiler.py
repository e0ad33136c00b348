"""Grammar compilation off the step loop: llguidance matchers built in a small thread pool, cached by
spec, with one deadline for every grammar kind.

llguidance releases the GIL while it builds a matcher, so a slow compile does not stall the engine
thread or the event loop. A compile that misses its deadline keeps running in its worker (threads
cannot be killed; llguidance's own size and fuel limits end it) and stays in the cache, so asking
again waits on the same compile instead of starting another.

llguidance recurses over the grammar: a JSON schema ~700 ``$ref`` levels deep or a Lark grammar of a
few thousand chained rules overflows a default 8 MiB thread stack and kills the whole process
(SIGSEGV). Its size limits bound the depth, so the compile threads get a stack that the deepest
grammar within those limits fits in (measured: a 4,000-level ``$ref`` chain and a 20,000-rule Lark
chain both compile or fail cleanly with 256 MiB). The stack is reserved address space, not memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import llguidance

from inferstack.engine.structured.spec import GrammarKind, GrammarSpec
from inferstack.engine.tokenizer import Tokenizer

COMPILE_STACK_BYTES = 256 << 20       # see the module docstring
# Compact JSON with the separators models write anyway: no free whitespace, which small models
# otherwise fill with endless newlines. oneOf is compiled as anyOf (llguidance cannot prove exclusivity).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}


class GrammarError(ValueError):
    """A grammar that does not compile, or not within the deadline; ``param`` names the request field."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompiledGrammar:
    spec: GrammarSpec
    prototype: llguidance.LLMatcher     # never advanced: each request gets a copy
    compile_s: float

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.prototype.deep_copy()


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec`` (cheap; building the matcher is the costly part)."""
    if spec.kind is GrammarKind.JSON:
        return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    if spec.kind is GrammarKind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if spec.kind is GrammarKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind is GrammarKind.CHOICE:
        options = json.loads(spec.source)
        if not options or not all(isinstance(o, str) for o in options):
            raise GrammarError("guided_choice must be a non-empty list of strings", "guided_choice")
        return llguidance.grammar_from("choice", spec.source)
    return llguidance.grammar_from("grammar", spec.source)


class _CompilePool:
    """``workers`` daemon threads with a COMPILE_STACK_BYTES stack running compiles.

    Daemon threads, unlike ThreadPoolExecutor's (joined at interpreter exit), let an engine that
    stops exit at once instead of waiting for a compile that outlived its deadline.
    """

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[cf.Future, Callable[[], Any]] | None] = queue.SimpleQueue()
        previous = threading.stack_size(COMPILE_STACK_BYTES)     # applies to threads started now
        try:
            self._threads = [threading.Thread(target=self._work, name=f"grammar-{i}", daemon=True)
                             for i in range(workers)]
            for thread in self._threads:
                thread.start()
        finally:
            threading.stack_size(previous)

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        future: cf.Future = cf.Future()
        self._jobs.put((future, fn))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:     # delivered to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, workers: int = 2, timeout_s: float = 10.0,
                 cache_size: int = 256) -> None:
        self.timeout_s = timeout_s
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._tokenizer = tokenizer
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, cf.Future[CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self._pool = _CompilePool(workers)
        self._pool.submit(lambda: self.lltokenizer)    # ~0.5 s, ahead of any request's deadline

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built from the `tokenizers` JSON (no transformers)."""
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids) or None)
            return self._lltok

    def submit(self, spec: GrammarSpec) -> cf.Future[CompiledGrammar]:
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut
            fut = self._pool.submit(partial(self._build, spec))
            self._cache[spec] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return fut

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Blocking compile with the deadline (offline use and tests)."""
        try:
            return self.submit(spec).result(self.timeout_s)
        except cf.TimeoutError:
            raise self._timeout(spec) from None

    async def compile_async(self, spec: GrammarSpec, param: str = "response_format") -> CompiledGrammar:
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.submit(spec))), self.timeout_s)
        except TimeoutError:
            raise self._timeout(spec, param) from None
        except GrammarError as exc:
            raise GrammarError(str(exc), param) from None

    def _timeout(self, spec: GrammarSpec, param: str = "response_format") -> GrammarError:
        return GrammarError(f"The {spec.kind.value} grammar did not compile within {self.timeout_s:g} s; "
                            "simplify it (fewer nested alternatives, smaller repetition counts).", param)

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            text = grammar_text(spec)
        except ValueError as exc:
            raise GrammarError(f"Invalid {spec.kind.value} grammar: {exc}") from None
        matcher = llguidance.LLMatcher(self.lltokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"Invalid {spec.kind.value} grammar: {matcher.get_error()}")
        return CompiledGrammar(spec, matcher, time.perf_counter() - start)

    def shutdown(self) -> None:
        self._pool.shutdown()
