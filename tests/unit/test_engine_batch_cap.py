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
    # exported on /metrics as `inferstack:max_num_seqs`: the gateway's saturation signal reads it
    assert (cpu.core.stats().max_num_seqs, gpu.core.stats().max_num_seqs) == (8, 256)


def test_a_grammar_that_fails_while_generating_is_the_clients_400():
    """llguidance can give up mid-generation on a huge schema (its parser row limit): the client's schema,
    not an engine fault, so a 400 naming why instead of a 500 (engine/serving.py `_finish_reason`)."""
    import pytest

    from inferstack.engine.outputs import GRAMMAR_FAILED, FinishReason, RequestOutput
    from inferstack.engine.serving import _finish_reason
    from inferstack.protocol.errors import APIError

    out = RequestOutput(request_id="r", index=0, new_token_ids=[], new_text="", finish_reason=FinishReason.ERROR,
                        stop_reason=GRAMMAR_FAILED + "Parser Error: Current row has 11999 items; max is 2000")
    with pytest.raises(APIError) as exc:
        _finish_reason(out)
    assert exc.value.status == 400 and "max is 2000" in str(exc.value) and exc.value.param == "response_format"
    with pytest.raises(APIError) as exc:
        _finish_reason(RequestOutput(request_id="r", index=0, new_token_ids=[], new_text="",
                                     finish_reason=FinishReason.ERROR))
    assert exc.value.status == 500
