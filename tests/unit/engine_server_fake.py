"""A tiny stand-in for AsyncEngine, used only at the edge of the server's unit tests.

It follows the AsyncEngine contract (token-id prompts, SamplingParams, RequestOutput deltas with
``metrics`` timestamps, abort -> a final ABORT output) with a byte-level tokenizer and a scripted
"model" that emits the prompt's bytes back, so tests can predict every token.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

from inferstack.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.stats import EngineStats
from inferstack.engine.structured.spec import GrammarSpec
from inferstack.engine.tools.formats import FORMATS
from inferstack.protocol.strict_schema import StrictLimits

EOS = 256


class ByteTokenizer:
    vocab_size = 257
    chat_template = None
    eos_token_ids = frozenset({EOS})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return out if skip_special_tokens or EOS not in ids else out + "</s>"

    def special_token_id(self, text: str) -> int | None:
        return EOS if text == "</s>" else None

    def id_to_token(self, token_id: int) -> str:
        return "</s>" if token_id == EOS else self.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))  # no special tokens


class FakeEngine:
    """Emits the bytes of ``reply`` (default: the prompt's last 8 bytes, reversed) one per step."""

    def __init__(self, model_name: str = "fake-model", max_model_len: int = 512, step_s: float = 0.001,
                 reply: str | None = None) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.step_s = step_s
        self.reply = reply
        self.running: dict[str, int] = {}
        self.aborted: list[str] = []
        self.calls: list[tuple[list[int], SamplingParams, str, int, str | None]] = []
        self._abort_events: dict[str, asyncio.Event] = {}
        self._stats = EngineStats(num_kv_blocks=64)
        self.tool_format = FORMATS["hermes"]
        self.strict_limits = StrictLimits()
        self.grammars: list[tuple[GrammarSpec, str]] = []

    async def compile_grammar(self, spec: GrammarSpec, param: str) -> None:
        self.grammars.append((spec, param))

    error: BaseException | None = None

    def stats(self) -> EngineStats:
        self._stats.num_running = sum(self.running.values())
        return self._stats

    def metric_collectors(self) -> list:
        return []

    def ready_info(self) -> dict:
        return {}

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self._abort_events:
            self._abort_events[request_id].set()

    async def shutdown(self) -> None:
        pass

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt_token_ids, params, request_id, priority, cache_salt))
        abort = self._abort_events[request_id] = asyncio.Event()
        reply = (self.reply.encode() if self.reply is not None else bytes(reversed(bytes(
            t for t in prompt_token_ids[-8:] if t < 256))))
        script = [*list(reply), EOS]
        arrival = time.monotonic()
        times = {"arrival": arrival, "scheduled": arrival}
        produced = [0] * params.n
        done = [False] * params.n
        self.running[request_id] = params.n
        self._stats.prompt_tokens += len(prompt_token_ids)
        try:
            while not all(done):
                await asyncio.sleep(self.step_s)
                for i in range(params.n):
                    if done[i]:
                        continue
                    now = time.monotonic()
                    if abort.is_set():
                        done[i] = True
                        yield self._out(request_id, i, [], FinishReason.ABORT, produced[i], prompt_token_ids,
                                        {**times, "now": now}, params)
                        continue
                    tok = script[min(produced[i], len(script) - 1)]
                    produced[i] += 1
                    self._stats.generation_tokens += 1
                    times.setdefault("first_token", now)
                    finish = None
                    if tok == EOS and not params.ignore_eos:
                        finish = FinishReason.STOP
                    elif params.max_tokens is not None and produced[i] >= params.max_tokens:
                        finish = FinishReason.LENGTH
                    metrics = {**times, "now": now}
                    if finish is not None:
                        done[i] = True
                        metrics["finished"] = now
                        self._stats.request_success[finish.value] = self._stats.request_success.get(
                            finish.value, 0) + 1
                    yield self._out(request_id, i, [tok], finish, produced[i], prompt_token_ids, metrics, params)
        finally:
            self.running.pop(request_id, None)
            self._abort_events.pop(request_id, None)

    def _out(self, rid: str, index: int, toks: list[int], finish: FinishReason | None, produced: int,
             prompt: list[int], metrics: dict[str, float], params: SamplingParams) -> RequestOutput:
        text = self.tokenizer.decode(toks, skip_special_tokens=params.skip_special_tokens)
        lps = None
        if params.logprobs is not None:
            lps = [TokenLogprob(t, math.log(0.5), tuple((t + k, math.log(0.5 / (k + 1)))
                                                        for k in range(params.logprobs))) for t in toks]
        return RequestOutput(request_id=rid, index=index, new_token_ids=toks, new_text=text, finish_reason=finish,
                             logprobs=lps, num_prompt_tokens=len(prompt), num_cached_tokens=0,
                             num_output_tokens=produced, metrics=metrics)
