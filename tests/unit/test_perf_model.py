"""Roofline performance model against the worked example in docs/benchmarking.md ("Performance model")."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferstack.sim.hardware import get_hardware, hardware_names, load_hardware_file, save_hardware_file
from inferstack.sim.models import ModelSpec, get_model, model_names
from inferstack.sim.perf_model import (
    DecodePricing,
    SeqWork,
    decode_floor_s,
    kv_capacity_tokens,
    kv_transfer_time,
    ridge_batch,
    step_cost,
    step_time,
    tp_comm_s,
)

H100 = get_hardware("h100")
LLAMA8 = get_model("llama-3-8b")


def test_llama3_8b_parameter_count_and_kv_per_token() -> None:
    assert LLAMA8.total_params == pytest.approx(8.03e9, rel=0.01)
    assert LLAMA8.kv_bytes_per_token == 128 * 1024        # 2·32 layers·8 heads·128·2 bytes


def test_llama3_8b_bf16_h100_decode_floor_is_4_8_ms() -> None:
    assert decode_floor_s(LLAMA8, H100) * 1e3 == pytest.approx(4.8, abs=0.05)


def test_single_decode_step_is_memory_bound_near_the_floor() -> None:
    cost = step_cost(LLAMA8, H100, [SeqWork(context=100, new_tokens=1)])
    assert cost.memory_s > 10 * cost.compute_s
    floor = decode_floor_s(LLAMA8, H100)
    # the model adds bandwidth efficiency and launch overhead, as real engines show (5 ms floor, 6-8 ms real)
    assert floor < cost.time_s < 1.5 * floor


def test_batch_64_at_2k_context_reads_the_kv_cache() -> None:
    batch = [SeqWork(context=2048, new_tokens=1)] * 64
    cost = step_cost(LLAMA8, H100, batch)
    assert cost.kv_bytes == pytest.approx(17.2e9, rel=0.01)
    assert cost.flops == pytest.approx(1.1e12, rel=0.15)
    # 33 GB at 3.35 TB/s ≈ 9.9 ms at full bandwidth
    assert cost.bytes / H100.mem_bandwidth * 1e3 == pytest.approx(9.9, rel=0.03)
    assert cost.memory_s > cost.compute_s


def test_2k_prefill_is_compute_bound_about_69_ms_at_half_mfu() -> None:
    cost = step_cost(LLAMA8, H100, [SeqWork(context=0, new_tokens=2048)])
    # The research estimate (3.4e13 FLOP, 69 ms) charges embedding + LM head GEMMs to all 2048 tokens;
    # engines compute logits for the sampled (last) token only, which removes 2·(2·V·d)·(T−1).
    head = 2 * 2 * LLAMA8.embedding_params * 2047
    assert cost.flops + head == pytest.approx(3.4e13, rel=0.03)
    assert cost.compute_s > cost.memory_s
    assert (cost.flops + head) / (H100.peak_flops * 0.5) * 1e3 == pytest.approx(69, rel=0.03)


def test_ridge_point_of_h100_bf16_is_about_295() -> None:
    assert ridge_batch(LLAMA8, H100) == pytest.approx(295, rel=0.01)


def test_h200_decodes_faster_than_h100_and_l4_slower() -> None:
    batch = [SeqWork(context=512, new_tokens=1)] * 8
    t = {hw: step_time(LLAMA8, get_hardware(hw), batch) for hw in ("h100", "h200", "l4")}
    assert t["h200"] < t["h100"] < t["l4"]


def test_tensor_parallelism_splits_work_and_adds_communication() -> None:
    big = get_model("llama-3-70b")
    batch = [SeqWork(context=1024, new_tokens=1)] * 16
    one, four = step_cost(big, H100, batch, tp=1), step_cost(big, H100, batch, tp=4)
    assert four.comm_s > 0 and one.comm_s == 0
    assert four.time_s < one.time_s / 2
    with pytest.raises(ValueError, match="interconnect"):
        step_cost(big, get_hardware("l4"), batch, tp=2)


def test_kv_capacity() -> None:
    tokens = kv_capacity_tokens(LLAMA8, H100, memory_utilization=0.9)
    assert tokens == pytest.approx((72e9 - 16.06e9) / 131072, rel=0.01)
    with pytest.raises(ValueError, match="does not fit"):
        kv_capacity_tokens(get_model("llama-3-70b"), H100)


def test_empty_step_costs_nothing() -> None:
    assert step_time(LLAMA8, H100, []) == 0.0


@given(st.lists(st.tuples(st.integers(0, 8000), st.integers(1, 512)), min_size=1, max_size=32),
       st.tuples(st.integers(0, 8000), st.integers(1, 512)))
def test_step_time_is_monotone_in_work(batch: list[tuple[int, int]], extra: tuple[int, int]) -> None:
    work = [SeqWork(c, p) for c, p in batch]
    more = [*work, SeqWork(*extra)]
    assert step_time(LLAMA8, H100, more) >= step_time(LLAMA8, H100, work)
    longer = [SeqWork(w.context + 100, w.new_tokens) for w in work]
    assert step_time(LLAMA8, H100, longer) >= step_time(LLAMA8, H100, work)


def _step_time_reference(model: ModelSpec, hw, batch: list[SeqWork], tp: int) -> float:
    """The step time as the model defines it, written out operation by operation (the order the floats are
    added in is part of what the simulator's replay hashes pin)."""
    items = [w for w in batch if w.new_tokens > 0]
    if not items:
        return 0.0
    gemm, lm_head = 2.0 * model.num_layers * model.layer_params, 2.0 * model.embedding_params
    attn = 4.0 * model.num_layers * model.q_size
    prefill = decode = 0.0
    tokens = kv_tokens = 0
    for w in items:
        p, c = w.new_tokens, w.context
        f = gemm * p + (lm_head if w.samples else 0.0) + attn * (p * c + p * (p + 1) / 2)
        if p > 1:
            prefill += f
        else:
            decode += f
        tokens += p
        kv_tokens += c + p
    compute_s = (prefill / (hw.peak_flops * hw.mfu_prefill) + decode / (hw.peak_flops * hw.mfu_decode)) / tp
    bandwidth = hw.mem_bandwidth * hw.bw_efficiency * (hw.single_row_bw_gain if tokens == 1 else 1.0)
    memory_s = (model.weight_bytes_total + model.kv_bytes_per_token * kv_tokens) / bandwidth / tp
    overhead_s = hw.step_overhead_s + hw.seq_overhead_s * len(items) + hw.token_overhead_s * tokens
    return max(compute_s, memory_s) + tp_comm_s(hw, model, tp, tokens) + overhead_s


@given(st.lists(st.tuples(st.integers(0, 8000), st.integers(0, 2048), st.booleans()), max_size=24),
       st.sampled_from([1, 2, 4]), st.sampled_from(["h100", "a100", "cpu"]))
def test_replica_step_pricing_is_step_time_float_for_float(batch: list[tuple[int, int, bool]], tp: int,
                                                           hw_name: str) -> None:
    """A replica prices its steps with `DecodePricing.step_time` over (context, new tokens, samples) triples,
    without building `SeqWork`s or a `StepCost`: the same float as `step_time`, and as the model's formula."""
    hw = get_hardware(hw_name)
    if tp > 1 and hw.link_bandwidth <= 0:
        tp = 1
    work = [SeqWork(c, p, s) for c, p, s in batch]
    want = _step_time_reference(LLAMA8, hw, work, tp)
    assert step_time(LLAMA8, hw, work, tp) == want
    assert DecodePricing(LLAMA8, hw, tp).step_time(batch) == want


def test_catalogs_cover_the_issue() -> None:
    assert {"h100", "h200", "a100", "l4", "cpu"} <= set(hardware_names())
    assert {"llama-3-8b", "llama-3-70b", "qwen3-8b", "qwen3-32b", "smollm2-135m"} <= set(model_names())
    for name in model_names():
        spec = get_model(name)
        assert spec.total_params > 1e8 and spec.kv_bytes_per_token > 0


def test_smollm2_135m_matches_its_size() -> None:
    assert get_model("smollm2-135m").total_params == pytest.approx(134.5e6, rel=0.01)


def test_model_from_hf_config_file_and_errors(tmp_path) -> None:
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
           "vocab_size": 1000, "torch_dtype": "float32", "_name_or_path": "tiny"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = get_model(str(tmp_path))
    assert isinstance(spec, ModelSpec) and spec.name == "tiny" and spec.num_kv_heads == 4 and spec.weight_bytes == 4
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        get_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"a": 1,\n oops}')
    with pytest.raises(ValueError, match=r"config.json:2"):
        get_model(str(tmp_path))
    with pytest.raises(KeyError, match="unknown model"):
        get_model("no-such-model")


def test_hardware_file_round_trip_and_unknown(tmp_path) -> None:
    path = tmp_path / "cpu.json"
    save_hardware_file(get_hardware("cpu"), path)
    assert load_hardware_file(path) == get_hardware("cpu")
    path.write_text(json.dumps({"name": "cpu", "warp_drive": 1}))
    with pytest.raises(ValueError, match="warp_drive"):
        load_hardware_file(path)
    with pytest.raises(KeyError, match="unknown hardware"):
        get_hardware("tpu9")
    for field, value, message in (("single_row_bw_gain", 0, "> 0"), ("mem_bandwidth", "fast", "> 0"),
                                  ("net_latency_s", -1, ">= 0"), ("mfu_decode", True, "> 0")):
        path.write_text(json.dumps({"name": "cpu", field: value}))
        with pytest.raises(ValueError, match=f"{field} must be a number {message}"):
            load_hardware_file(path)


def test_calibration_recovers_a_known_profile() -> None:
    import numpy as np

    from inferstack.sim.calibrate import StepSample, fit_hardware

    model = get_model("smollm2-135m")
    truth = get_hardware("cpu")
    rng = np.random.default_rng(0)
    samples = []
    for b in (1, 2, 4, 8, 16, 32):
        for ctx in (16, 128, 512):
            work = tuple(SeqWork(ctx, 1) for _ in range(b))
            samples.append(StepSample(work, step_time(model, truth, work) * rng.uniform(0.97, 1.03)))
    for n in (16, 64, 256, 1024):
        work = (SeqWork(0, n),)
        samples.append(StepSample(work, step_time(model, truth, work) * rng.uniform(0.97, 1.03)))
    fitted, report = fit_hardware(model, samples, truth)
    assert report["median_rel_error"] < 0.03
    assert (truth.single_row_bw_gain > 1.5
            and fitted.single_row_bw_gain == pytest.approx(truth.single_row_bw_gain, abs=0.1))
    for b, n in ((1, 1), (3, 1), (24, 1), (1, 700)):
        work = [SeqWork(200, n)] * b
        assert step_time(model, fitted, work) == pytest.approx(step_time(model, truth, work), rel=0.08)
    with pytest.raises(ValueError, match="at least 4"):
        fit_hardware(model, samples[:2], truth)


def test_kv_transfer_time_of_a_2k_prompt_over_h100_nics() -> None:
    # 2,048 tokens × 128 KiB = 268 MB over a 400 Gb/s NIC at 90 %: 6 ms + 1 ms fixed.
    t = kv_transfer_time(LLAMA8, H100, 2048)
    assert t == pytest.approx(1e-3 + 2048 * 131072 / (50e9 * 0.9), rel=1e-9)
    assert 6.5e-3 < t < 7.5e-3
    assert kv_transfer_time(LLAMA8, H100, 2048, tp=4) < t, "each TP rank sends its heads on its own NIC"
    ethernet = dataclasses.replace(H100, net_bandwidth=25e9 / 8)       # what --emulate-kv-link-gbps 25 sets
    assert kv_transfer_time(LLAMA8, ethernet, 2048) > 10 * t
    assert kv_transfer_time(LLAMA8, H100, 0) == 0.0
    with pytest.raises(ValueError, match="no network bandwidth"):
        kv_transfer_time(LLAMA8, dataclasses.replace(H100, net_bandwidth=0), 16)
