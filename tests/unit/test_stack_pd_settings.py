"""`inferstack up --prefill X --decode Y` (xPyD): settings validation, engine roles, the generated PD pool."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from inferstack.config.schema import PoolConfig
from inferstack.stack import plan
from inferstack.stack.config_section import load_up_settings
from inferstack.stack.settings import UpSettings, usable_cores


@given(st.integers(1, 8), st.integers(1, 8))
def test_pd_engine_count_is_prefill_plus_decode(p: int, d: int) -> None:
    s = UpSettings(pd={"prefill": p, "decode": d})
    assert s.replicas == p + d
    assert s.roles() == ["prefill"] * p + ["decode"] * d
    assert s.threads_per_engine() == max(1, usable_cores() // (p + d))
    assert UpSettings(pd={"prefill": p, "decode": d}, replicas=p + d).replicas == p + d


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pd": {"prefill": 0, "decode": 1}}, "greater than or equal to 1"),
    ({"pd": {"prefill": 1, "decode": 0}}, "greater than or equal to 1"),
    ({"pd": {"prefill": 1}}, "decode"),
    ({"pd": {"prefill": 1, "decode": 1}, "replicas": 3}, "replicas=3 contradicts pd"),
    ({"kv": {"tiers": ["host"]}, "emulate": "h100:llama-3-8b"}, "kv tiers need real engines"),
    ({"pd": {"prefill": 1, "decode": 1, "threshold_tokens": -1}}, "greater than or equal to 0"),
])
def test_bad_pd_settings_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UpSettings(**kwargs)


def test_cli_pd_overrides_the_files_pd_without_clashing_with_the_derived_count() -> None:
    base = UpSettings(pd={"prefill": 1, "decode": 1})
    assert "replicas" not in base.model_fields_set
    s = UpSettings.model_validate({**base.model_dump(exclude_unset=True), "pd": {"prefill": 2, "decode": 3}})
    assert s.replicas == 5


def test_engines_get_their_role_and_role_names() -> None:
    specs = plan.engine_specs(UpSettings(pd={"prefill": 2, "decode": 1}, threads=1), python="py")
    assert [(s.name, s.role) for s in specs] == [("prefill-0", "prefill"), ("prefill-1", "prefill"),
                                                 ("decode-0", "decode")]
    for s in specs:  # the role is in argv, so a restart (same spec) keeps it
        assert s.argv[s.argv.index("--role") + 1] == s.role
        assert s.argv[s.argv.index("--threads") + 1] == "1"
        assert "--kv-transport" not in s.argv           # auto: the engine's own default
    plain = plan.engine_specs(UpSettings(replicas=2), python="py")
    assert [s.name for s in plain] == ["engine-0", "engine-1"]
    assert all(s.role is None and "--role" not in s.argv for s in plain)
    tcp = plan.engine_specs(UpSettings(pd={"prefill": 1, "decode": 1}, kv_transport="tcp"), python="py")
    assert all(s.argv[s.argv.index("--kv-transport") + 1] == "tcp" for s in tcp)


def test_emulated_pd_is_one_emulator_process_per_role() -> None:
    specs = plan.engine_specs(UpSettings(pd={"prefill": 3, "decode": 2}, emulate="h100:llama-3-8b"), python="py")
    assert [(s.name, s.role) for s in specs] == [("prefill", "prefill"), ("decode", "decode")]
    for spec, count in zip(specs, ("3", "2"), strict=True):
        assert spec.argv[spec.argv.index("--emulate-count") + 1] == count
        assert spec.argv[spec.argv.index("--role") + 1] == spec.role
        assert spec.argv[spec.argv.index("--emulate") + 1] == "h100:llama-3-8b"


def test_pd_gateway_config_is_a_valid_pd_pool_and_keeps_the_users_pools() -> None:
    s = UpSettings(pd={"prefill": 1, "decode": 2, "threshold_tokens": 16, "max_prefill_queue": 3})
    eps = [("prefill-0", "http://127.0.0.1:1", "prefill"), ("decode-0", "http://127.0.0.1:2", "decode"),
           ("decode-1", "http://127.0.0.1:3", "decode")]
    user = {"pools": {"other": {"endpoints": ["http://127.0.0.1:9"]}}, "up": {"pd": {"prefill": 1, "decode": 2}}}
    cfg = plan.pd_gateway_config(s, eps, user)
    assert set(cfg["pools"]) == {"other", "default"} and cfg["up"] == user["up"]
    pool = PoolConfig.model_validate(cfg["pools"]["default"])
    assert [(e.name, e.role) for e in pool.endpoints] == [("prefill-0", "prefill"), ("decode-0", "decode"),
                                                          ("decode-1", "decode")]
    assert pool.pd is not None and pool.pd.enabled and pool.pd.threshold_tokens == 16
    assert pool.pd.max_prefill_queue == 3
    assert "default" not in user["pools"], "the user's config is not modified"


def test_up_pd_section_in_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text("up:\n  pd:\n    prefill: 2\n    decode: 1\n    threshold_tokens: 32\n")
    s = load_up_settings(cfg)
    assert (s.replicas, s.pd.threshold_tokens if s.pd else None) == (3, 32)
    cfg.write_text("up:\n  replicas: 4\n  pd: {prefill: 1, decode: 1}\n")
    with pytest.raises(ValueError, match=r"inferstack.yaml:\d+: .*replicas=4 contradicts pd"):
        load_up_settings(cfg)
