"""Accuracy of a weight format against the fp32 reference (`inferstack model eval`).

For each format, on the same model:

* **top-1 agreement** and **mean KL(fp32 ‖ format)** of the next-token distributions at every position
  of held-out chat prompts followed by the fp32 model's greedy answer (teacher forcing: both models
  see the same tokens, so one early difference does not spoil the rest);
* **greedy agreement**: share of generated tokens equal to fp32's before the first divergence, and
  how many of the prompts' whole answers are identical;
* **perplexity** of real English text (a license text every Debian/Ubuntu machine has under
  ``/usr/share/common-licenses``), in non-overlapping windows;
* **batch-1 decode tok/s**, so speed and accuracy sit in one table.

Quantized formats are scored with ``dense_prefill`` off, so every position goes through the int8/int4
kernels that decode steps use (with the bf16 copy, long prompts would be scored by bf16 instead).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.executor.kv_format import KVFormat
from inferstack.engine.llm import LLM, expand_choices
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.weights.loader import LoadedModel

# Not used by any test or benchmark prompt set: held out from everything we tuned on.
HELD_OUT_PROMPTS = (
    "Why is the sky blue? Explain briefly.",
    "Write two sentences about a cat who learns to swim.",
    "What are the three states of matter?",
    "Summarize the plot of Cinderella in one paragraph.",
    "Give me three tips for a job interview.",
    "What does a compiler do?",
    "Name four planets of the solar system.",
    "How many days are in a leap year, and why?",
    "Suggest a name for a bakery and explain it.",
    "What is the difference between weather and climate?",
    "Write a short thank-you note to a teacher.",
    "Explain photosynthesis to a ten-year-old.",
)
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
BLOCK = 16


@dataclass
class FormatScore:
    name: str                  # e.g. "int4" or "float32 (reference)"
    top1: float                # share of positions whose argmax equals fp32's
    mean_kl: float             # nats
    greedy_tokens: float       # share of generated tokens equal to fp32's before the first divergence
    greedy_exact: int          # prompts with an identical answer
    prompts: int
    perplexity: float
    decode_tok_s: float
    weight_mib: float


def score_tokens(lm: LoadedModel, ids: list[int], fmt: KVFormat | None = None) -> torch.Tensor:
    """fp32 logits ``[len(ids), vocab]`` of one sequence through a private KV cache, in chunks of
    ``BLOCK`` tokens: every chunk after the first reads its context back from the cache, so a KV
    format's rounding (``fmt``; None: the activations as they are) shows in the scores."""
    arch, n = lm.arch, len(ids)
    blocks = -(-n // BLOCK)
    row, storage = (arch.head_dim, lm.dtype) if fmt is None else (fmt.row, fmt.storage)
    caches = [torch.zeros((2, blocks, BLOCK, arch.num_kv_heads, row), dtype=storage)
              for _ in range(arch.num_layers)]
    tables = torch.arange(blocks)[None]
    out = []
    with torch.inference_mode():
        for start in range(0, n, BLOCK):
            end = min(n, start + BLOCK)
            q = end - start
            meta = AttentionMetadata(slot_mapping=torch.arange(start, end), query_start_loc=torch.tensor([0, q]),
                                     seq_lens=torch.tensor([end]), block_tables=tables, query_lens_list=[q],
                                     seq_lens_list=[end], block_size=BLOCK, kv_format=fmt)
            hidden = lm.model(torch.tensor(ids[start:end]), torch.arange(start, end), caches, meta)
            out.append(lm.model.compute_logits(hidden).float())
    return torch.cat(out)


def text_windows(lm: LoadedModel, text: str, window: int, max_tokens: int) -> list[list[int]]:
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def perplexity(lm: LoadedModel, windows: list[list[int]], fmt: KVFormat | None = None) -> float:
    return score_text(lm, windows, fmt).perplexity


@dataclass
class TextScore:
    """Scores of one model on text windows, from one pass over each window (lists: one entry per window)."""
    top: list[torch.Tensor]     # argmax per position
    nll: list[float]            # summed next-token negative log-likelihood
    count: list[int]            # predicted tokens (the window's length - 1)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / sum(self.count))

    def first(self, n: int) -> TextScore:
        """The scores of the first ``n`` windows only."""
        return TextScore(self.top[:n], self.nll[:n], self.count[:n])

    def agreement(self, ref: TextScore) -> float:
        """Share of positions whose argmax equals ``ref``'s (over ``ref``'s windows)."""
        pairs = zip(self.top, ref.top, strict=True)
        return sum((a == b).sum().item() for a, b in pairs) / sum(len(t) for t in ref.top)


def score_text(lm: LoadedModel, windows: list[list[int]], fmt: KVFormat | None = None) -> TextScore:
    """Top-1 per position and perplexity together: one ``score_tokens`` per window instead of two."""
    score = TextScore([], [], [])
    for ids in windows:
        logits = score_tokens(lm, ids, fmt)
        score.top.append(logits.argmax(-1))
        score.nll.append(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item())
        score.count.append(len(ids) - 1)
    return score


def decode_rate(llm: LLM, steps: int = 64, prompt_len: int = 32) -> float:
    """Batch-1 decode tokens/s after the prompt's prefill (random prompt tokens, EOS ignored)."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(100, llm.tokenizer.vocab_size - 100, (prompt_len,), generator=g).tolist()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))   # warm-up
    core = llm.engine.core
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    (request,) = expand_choices("decode-rate", prompt, params, time.monotonic(), frozenset())
    core.add_request(request)
    core.step()   # prefill and the first token
    t, n = time.perf_counter(), 0
    while core.has_unfinished():
        n += len(core.step())
    return n / (time.perf_counter() - t)


@dataclass
class Reference:
    sequences: list[list[int]]        # prompt + fp32 greedy answer
    prompt_lens: list[int]
    answers: list[list[int]]
    log_probs: list[torch.Tensor]     # fp32 log-softmax per sequence


def reference(llm: LLM, prompts: tuple[str, ...], new_tokens: int) -> Reference:
    tok = llm.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
           for p in prompts]
    results = llm.generate(ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    answers = [r.outputs[0].token_ids for r in results]
    seqs = [p + a for p, a in zip(ids, answers, strict=True)]
    lm = llm.engine.core.executor.lm
    return Reference(seqs, [len(p) for p in ids], answers,
                     [score_tokens(lm, s).log_softmax(-1) for s in seqs])


def compare(llm: LLM, ref: Reference) -> tuple[float, float, float, int]:
    """``(top-1 agreement, mean KL, greedy token agreement, identical answers)`` against ``ref``."""
    executor = llm.engine.core.executor
    agree = positions = 0
    kl_sum = 0.0
    for seq, ref_lp in zip(ref.sequences, ref.log_probs, strict=True):
        lp = score_tokens(executor.lm, seq, executor.kv_format).log_softmax(-1)
        agree += (lp.argmax(-1) == ref_lp.argmax(-1)).sum().item()
        kl_sum += (ref_lp.exp() * (ref_lp - lp)).sum().item()
        positions += len(seq)
    prompts = [s[:n] for s, n in zip(ref.sequences, ref.prompt_lens, strict=True)]
    params = SamplingParams(temperature=0, max_tokens=len(ref.answers[0]), ignore_eos=True)
    outs = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    same = exact = 0
    for ours, theirs in zip(outs, ref.answers, strict=True):
        prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(theirs))
        same += prefix
        exact += prefix == len(theirs)
    total = sum(len(a) for a in ref.answers)
    return agree / positions, kl_sum / positions, same / total, exact


def _weight_mib(lm: LoadedModel) -> float:
    if lm.quant is not None:
        return lm.quant.quantized_bytes / 2 ** 20
    return lm.arch.weight_bytes_per_step / 2 ** 20


def evaluate(model: str, formats: list[tuple[str, dict]], text: str, *, new_tokens: int = 32,
             prompts: tuple[str, ...] = HELD_OUT_PROMPTS, window: int = 256, max_text_tokens: int = 2048,
             decode_steps: int = 64,
             threads: int | None = None, progress: Callable[[str], None] | None = None) -> list[FormatScore]:
    """Score each ``(name, LLM keyword arguments)`` against fp32 weights and activations."""
    say = progress or (lambda _msg: None)
    common = {"num_threads": threads, "kv_cache_bytes": 256 << 20}
    say("fp32 reference")
    ref_llm = LLM(model, dtype="float32", **common)
    ref_lm = ref_llm.engine.core.executor.lm
    ref = reference(ref_llm, prompts, new_tokens)
    windows = text_windows(ref_lm, text, window, max_text_tokens)
    scores = [FormatScore("float32 (reference)", 1.0, 0.0, 1.0, len(prompts), len(prompts),
                          perplexity(ref_lm, windows), decode_rate(ref_llm, decode_steps), _weight_mib(ref_lm))]
    del ref_llm, ref_lm
    gc.collect()
    for name, kwargs in formats:
        say(name)
        llm = LLM(model, **common, **kwargs)
        lm = llm.engine.core.executor.lm
        top1, kl, greedy, exact = compare(llm, ref)
        ppl = perplexity(lm, windows, llm.engine.core.executor.kv_format)
        scores.append(FormatScore(name, top1, kl, greedy, exact, len(prompts), ppl,
                                  decode_rate(llm, decode_steps), _weight_mib(lm)))
        del llm, lm
        gc.collect()
    return scores


def markdown_table(scores: list[FormatScore], text_name: str) -> str:
    lines = [f"| format | weights MiB | batch-1 decode tok/s | top-1 agreement | mean KL (nats) | greedy tokens "
             f"| identical answers | perplexity ({text_name}) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = scores[0].perplexity
    for s in scores:
        ppl = f"{s.perplexity:.3f}" + ("" if s is scores[0] else f" ({100 * (s.perplexity / base - 1):+.2f} %)")
        lines.append(f"| {s.name} | {s.weight_mib:.0f} | {s.decode_tok_s:.1f} | {100 * s.top1:.2f} % | "
                     f"{s.mean_kl:.4f} | {100 * s.greedy_tokens:.1f} % | {s.greedy_exact}/{s.prompts} | {ppl} |")
    return "\n".join(lines)
