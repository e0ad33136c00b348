"""The running-batch cap a user gets: 256 on an accelerator, 8 per torch thread on CPU (real or emulated
on the `cpu` profile), the user's value whenever set (engine/config.py, cpu_max_num_seqs)."""

from __future__ import annotations

from inferstack.engine.config import EngineConfig
from inferstack.engine.executor.emulated import build_emulated_engine
from inferstack.sim.profile import parse_profile


def test_defaults_by_device_and_the_users_value_wins():
    assert EngineConfig(model="m").seq_limit == 256
    assert EngineConfig(model="m").on_cpu(threads=2).seq_limit == 16
    assert EngineConfig(model="m").on_cpu(threads=1).seq_limit == 8
    assert EngineConfig(model="m", max_num_seqs=64).on_cpu(threads=2).seq_limit == 64


def test_emulated_engines_cap_like_the_hardware_they_stand_for():
    cpu = build_emulated_engine(EngineConfig(model="smollm2-135m", device="cpu"), parse_profile("cpu:smollm2-135m"),
                                realtime=False)
    gpu = build_emulated_engine(EngineConfig(model="llama-3-8b"), parse_profile("h100:llama-3-8b"), realtime=False)
    assert cpu.core.scheduler.config.max_num_seqs == 8
    assert gpu.core.scheduler.config.max_num_seqs == 256
