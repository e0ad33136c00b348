"""Roofline step-time model for a dense decoder (docs/benchmarking.md, "Performance model").

A step is what the engine scheduler hands the executor: for each scheduled sequence, how many tokens
it already has in the KV cache (`context`) and how many new tokens run this step (`new_tokens`; 1 for
decode, a prompt chunk for prefill). The cost of a step is the sum of its parts; its time is the
larger of compute time and memory time, plus tensor-parallel communication and fixed overheads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from inferstack.sim.hardware import Hardware
from inferstack.sim.models import ModelSpec


@dataclass(frozen=True)
class SeqWork:
    context: int          # tokens already in the KV cache before this step
    new_tokens: int       # tokens computed this step
    samples: bool = True  # produces a token (decode, or the last chunk of a prompt)


@dataclass(frozen=True)
class StepCost:
    prefill_flops: float
    decode_flops: float
    weight_bytes: float
    kv_bytes: float
    compute_s: float
    memory_s: float
    comm_s: float
    overhead_s: float

    @property
    def flops(self) -> float:
        return self.prefill_flops + self.decode_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def time_s(self) -> float:
        return _time_s(self.compute_s, self.memory_s, self.comm_s, self.overhead_s)


def _time_s(compute_s: float, memory_s: float, comm_s: float, overhead_s: float) -> float:
    return max(compute_s, memory_s) + comm_s + overhead_s


def seq_flops(model: ModelSpec, work: SeqWork) -> float:
    """GEMM FLOPs for the new tokens plus causal attention over context + new tokens."""
    prefill, decode, _, _ = _sum_work([(work.context, work.new_tokens, work.samples)], *_flop_coefs(model))
    return prefill + decode     # one of them is 0.0 + the sequence's FLOPs, the other 0.0: that value exactly


def _flop_coefs(model: ModelSpec) -> tuple[float, float, float]:
    """(GEMM FLOPs per token, LM head FLOPs per sampled token, attention FLOPs per attended key)."""
    return (2.0 * model.num_layers * model.layer_params, 2.0 * model.embedding_params,
            4.0 * model.num_layers * model.q_size)


def _sum_work(items: Iterable[tuple[int, int, bool]], gemm_per_token: float, lm_head: float,
              attn_coef: float) -> tuple[float, float, int, int]:
    """(prefill FLOPs, decode FLOPs, new tokens, KV tokens after the step) of (context, new tokens, samples)."""
    prefill_flops = decode_flops = 0.0
    tokens = kv_tokens = 0
    for c, p, samples in items:
        # QK^T and AV: 2 FLOPs per multiply-add, each over the attended keys (c + causal half of p).
        f = gemm_per_token * p + (lm_head if samples else 0.0) + attn_coef * (p * c + p * (p + 1) / 2)
        if p > 1:
            prefill_flops += f
        else:
            decode_flops += f
        tokens += p
        kv_tokens += c + p
    return prefill_flops, decode_flops, tokens, kv_tokens


def step_cost(model: ModelSpec, hw: Hardware, batch: Iterable[SeqWork], tp: int = 1) -> StepCost:
    return DecodePricing(model, hw, tp).cost([(w.context, w.new_tokens, w.samples) for w in batch])


def tp_comm_s(hw: Hardware, model: ModelSpec, tp: int, tokens: int) -> float:
    """A step's tensor-parallel all-reduces: two per layer over ``tokens`` rows of the hidden state (0 at tp 1)."""
    if tp <= 1:
        return 0.0
    if hw.link_bandwidth <= 0:
        raise ValueError(f"hardware {hw.name!r} has no interconnect bandwidth for tensor parallelism")
    per_allreduce = hw.link_latency_s + 2 * (tp - 1) / tp * tokens * model.hidden_size * 2 / hw.link_bandwidth
    return 2 * model.num_layers * per_allreduce


def step_time(model: ModelSpec, hw: Hardware, batch: Iterable[SeqWork], tp: int = 1) -> float:
    return step_cost(model, hw, batch, tp).time_s


def decode_step_times(model: ModelSpec, hw: Hardware, contexts: Sequence[int], steps: int, tp: int = 1) -> list[float]:
    """`step_time` of ``steps`` consecutive decode steps of one batch (sequence i at context
    ``contexts[i] + j`` in step j), float for float the same as pricing each step's batch with `step_time`
    (the same operations in the same order), at a fraction of the cost: the simulator's decode leaps."""
    return DecodePricing(model, hw, tp).times(contexts, steps)


class DecodePricing:
    """Step pricing with the model's and hardware's constants worked out once (a replica prices a step or a
    leap at every arrival and finish; the constants are properties that recount the model's parameters).
    `step_cost` goes through `cost`, so `step_time` here is the module's `step_time`, float for float."""

    def __init__(self, model: ModelSpec, hw: Hardware, tp: int = 1) -> None:
        self.model, self.hw, self.tp = model, hw, tp
        self.coefs = _flop_coefs(model)
        self.base = 2.0 * model.num_layers * model.layer_params * 1 + 2.0 * model.embedding_params
        self.attn = 4.0 * model.num_layers * model.q_size
        self.weight_bytes, self.kv_per_token = model.weight_bytes_total, model.kv_bytes_per_token
        self.prefill_rate, self.decode_rate = hw.peak_flops * hw.mfu_prefill, hw.peak_flops * hw.mfu_decode
        self.bandwidth_one = hw.mem_bandwidth * hw.bw_efficiency * hw.single_row_bw_gain
        self.bandwidth = hw.mem_bandwidth * hw.bw_efficiency * 1.0

    def cost(self, batch: Iterable[tuple[int, int, bool]]) -> StepCost:
        """`step_cost` of a step given as (context, new tokens, samples) per scheduled sequence."""
        items = [w for w in batch if w[1] > 0]
        if not items:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return StepCost(*self._parts(items))

    def step_time(self, batch: Iterable[tuple[int, int, bool]]) -> float:
        """`cost(batch).time_s` without building the `StepCost` (the simulator prices a step per arrival)."""
        items = [w for w in batch if w[1] > 0]
        if not items:
            return 0.0
        parts = self._parts(items)
        return _time_s(parts[4], parts[5], parts[6], parts[7])

    def _parts(self, items: list[tuple[int, int, bool]]) -> tuple[float, float, float, float, float, float,
                                                                     float, float]:
        """`StepCost`'s fields, in its order, for non-empty ``items`` (each with new tokens)."""
        hw, tp = self.hw, self.tp
        prefill_flops, decode_flops, tokens, kv_tokens = _sum_work(items, *self.coefs)
        kv_bytes = self.kv_per_token * kv_tokens
        compute_s = (prefill_flops / self.prefill_rate + decode_flops / self.decode_rate) / tp
        bandwidth = self.bandwidth_one if tokens == 1 else self.bandwidth
        memory_s = (self.weight_bytes + kv_bytes) / bandwidth / tp
        comm_s = tp_comm_s(hw, self.model, tp, tokens)
        overhead_s = hw.step_overhead_s + hw.seq_overhead_s * len(items) + hw.token_overhead_s * tokens
        return prefill_flops, decode_flops, self.weight_bytes, kv_bytes, compute_s, memory_s, comm_s, overhead_s

    def times(self, contexts: Sequence[int], steps: int) -> list[float]:
        if not contexts:
            return [0.0] * steps
        if steps <= 0:
            return []
        model, hw, tp, base, attn = self.model, self.hw, self.tp, self.base, self.attn
        n = len(contexts)
        ctx_sum = sum(contexts)
        weight_bytes, kv_per_token = self.weight_bytes, self.kv_per_token
        prefill_rate, decode_rate = self.prefill_rate, self.decode_rate
        bandwidth = self.bandwidth_one if n == 1 else self.bandwidth
        comm_s = tp_comm_s(hw, model, tp, n)
        overhead_s = hw.step_overhead_s + hw.seq_overhead_s * n + hw.token_overhead_s * n
        # (0.0 + x) / 1 and y + 0.0 are x and y exactly: the usual case (no prefill, tp 1) skips those passes
        no_prefill = 0.0 / prefill_rate
        exact_compute = no_prefill != 0.0 or tp != 1
        # Every IEEE operation below is monotone, so compute time grows with the step: when the last step's
        # compute time is within the first step's memory time, every step is memory-bound and `max` picks the
        # memory time (equal values are the same float), so the FLOP matrix need not be built (the usual case
        # on a GPU: an H100 leap of Llama-3-8B at ~10 sequences is ~20x below its ridge of ~200).
        last = _row_flops(contexts, steps - 1, base, attn) / decode_rate
        if exact_compute:
            last = (no_prefill + last) / tp
        if not exact_compute and comm_s == 0.0 and last <= (weight_bytes + kv_per_token * (ctx_sum + n)) / bandwidth:
            # the usual leap, memory-bound at tp 1: numpy's elementwise operations below, one float at a time
            # (the same IEEE operations on the same values; a leap is ~10-60 steps, below numpy's fixed costs)
            return [(weight_bytes + kv_per_token * (ctx_sum + n * j + n)) / bandwidth + overhead_s
                    for j in range(steps)]
        js = np.arange(steps)
        memory_s = (weight_bytes + kv_per_token * (ctx_sum + n * js + n)) / bandwidth
        if tp != 1:
            memory_s = memory_s / tp
        if last <= memory_s[0]:
            busy = memory_s
        else:
            # One row per step, one column per sequence, with `step_cost`'s IEEE operations elementwise: numpy's
            # cumulative sum adds left to right as its loop does (unlike `sum`, which is pairwise), so the last
            # column is its FLOP total bit for bit.
            terms = base + attn * ((np.asarray(contexts, dtype=np.int64)[None, :] + js[:, None]) + 1.0)
            compute_s = terms.cumsum(axis=1)[:, -1] / decode_rate
            if exact_compute:
                compute_s = (no_prefill + compute_s) / tp
            busy = np.maximum(compute_s, memory_s)
        if comm_s != 0.0:
            busy = busy + comm_s
        return (busy + overhead_s).tolist()


def _row_flops(contexts: Sequence[int], j: int, base: float, attn: float) -> float:
    """The FLOP total of decode step ``j`` as `decode_step_times`' matrix row: the same terms, added left to
    right (an explicit loop: `sum` of floats is compensated from Python 3.12 on)."""
    total = 0.0
    for c in contexts:
        total += base + attn * ((c + j) + 1.0)
    return total


def decode_floor_s(model: ModelSpec, hw: Hardware, tp: int = 1) -> float:
    """The least time a decode step can take: streaming all weights once at peak bandwidth."""
    return model.weight_bytes_total / hw.mem_bandwidth / tp


def ridge_batch(model: ModelSpec, hw: Hardware) -> float:
    """Decode batch size above which weight GEMMs turn compute-bound (arithmetic intensity 2B/b_w)."""
    return hw.peak_flops / hw.mem_bandwidth * model.weight_bytes / 2


def kv_capacity_tokens(model: ModelSpec, hw: Hardware, memory_utilization: float = 0.9, tp: int = 1,
                       activation_bytes: float = 0.0) -> int:
    free = hw.memory_bytes * memory_utilization * tp - model.weight_bytes_total - activation_bytes
    if free <= 0:
        raise ValueError(f"{model.name} ({model.weight_bytes_total / 1e9:.1f} GB of weights) does not fit "
                         f"{tp}× {hw.name} at memory utilization {memory_utilization}")
    return int(free // model.kv_bytes_per_token)


def kv_transfer_time(model: ModelSpec, hw: Hardware, tokens: int, tp: int = 1) -> float:
    """Seconds to move ``tokens`` of KV from a prefill engine to a decode engine on another node:
    ``latency + tokens · kv_bytes_per_token / (net_bandwidth · efficiency · tp)`` — each of the
    ``tp`` devices sends its own KV heads over its own NIC."""
    if tokens <= 0:
        return 0.0
    if hw.net_bandwidth <= 0:
        raise ValueError(f"hardware {hw.name!r} has no network bandwidth for KV transfer")
    return hw.net_latency_s + tokens * model.kv_bytes_per_token / (hw.net_bandwidth * hw.net_efficiency * tp)
