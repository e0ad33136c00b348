"""`pools.<name>.spillover`, `tenants.<name>.local_only` and `pools.<name>.kubernetes.autoscale` in
inferstack.yaml: what loads, and the file:line errors for what does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferstack.config import ConfigError, parse_config

BASE = """\
pools:
  edge:
    endpoints: [http://127.0.0.1:8000]
    spillover: {pool: cloud, model: gpt-cloud}
  cloud:
    endpoints: [{url: "http://127.0.0.1:9000", api_key: sk-x}]
tenants:
  private: {local_only: true}
"""


def test_spillover_and_local_only_load():
    cfg = parse_config(BASE, "inferstack.yaml")
    spill = cfg.pools["edge"].spillover
    assert (spill.pool, spill.model, spill.when) == ("cloud", "gpt-cloud", ["no_replica", "saturated"])
    assert cfg.tenants["private"].local_only and not cfg.pools["cloud"].spillover


@pytest.mark.parametrize(("old", "new", "fragment"), [
    ("{pool: cloud, model: gpt-cloud}", "{pool: nowhere}", "spill-over pool 'nowhere' must be another configured pool"),
    ("{pool: cloud, model: gpt-cloud}", "{pool: edge}", "spill-over pool 'edge' must be another configured pool"),
    ("sk-x}]", "sk-x}]\n    spillover: {pool: edge}", "spills over itself; spill-over does not chain"),
    ("{pool: cloud, model: gpt-cloud}", "{pool: cloud, when: [busy]}", "'no_replica' or 'saturated'"),
])
def test_spillover_errors_name_the_line(old, new, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_config(BASE.replace(old, new), "inferstack.yaml")
    assert "inferstack.yaml:" in str(exc.value) and fragment in str(exc.value)


KUBE = """\
pools:
  p:
    kubernetes:
      inference_pool: p
      autoscale: {AUTO}
"""


def test_kubernetes_autoscale_loads_and_rejects_bad_specs():
    cfg = parse_config(KUBE.replace("{AUTO}", "{policy: 'slo:ttft_p95=1s', deployments: {prefill: a, decode: b}, "
                                              "min_replicas: 0}") + "    pd: {enabled: true}\n", "x.yaml")
    auto = cfg.pools["p"].kubernetes.autoscale
    assert (auto.min_replicas, auto.max_replicas, auto.interval_s) == (0, 10, 15.0)
    for auto, fragment in [
        ("{policy: 'hpa:metric=inferstack_gateway_requests_total', deployments: {both: d}}", "cumulative counter"),
        ("{policy: 'cpu', deployments: {both: d}}", "unknown autoscaling policy 'cpu'"),
        ("{policy: kpa, deployments: {both: d, decode: e}}", "not a mix"),
        ("{policy: kpa, deployments: {both: d}, min_replicas: 5, max_replicas: 2}", "max_replicas 2 < min_replicas 5"),
        ("{policy: kpa, deployments: {prefill: a, decode: b}}", "a PD pool (pd.enabled) scales `prefill` and"),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_config(KUBE.replace("{AUTO}", auto), "x.yaml")
        assert "x.yaml:" in str(exc.value) and fragment in str(exc.value), str(exc.value)


def test_the_endpoint_picker_drops_spillover():
    """Envoy only reaches the InferencePool's pods: a picker narrowed to one pool never spills."""
    from inferstack.epp.service import single_pool

    narrowed, name = single_pool(parse_config(BASE, "inferstack.yaml"), "edge")
    assert name == "edge" and set(narrowed.pools) == {"edge"} and narrowed.pools["edge"].spillover is None


def test_a_pool_that_scales_from_zero_may_start_without_endpoints():
    cfg = parse_config("pools:\n  default:\n    models: [m]\n    scale_from_zero: {timeout_s: 5}\n")
    assert cfg.pools["default"].endpoints == [] and cfg.pools["default"].models == ["m"]
    with pytest.raises(ConfigError, match="a pool needs `endpoints`"):
        parse_config("pools:\n  default:\n    models: [m]\n")


def test_up_starts_at_zero_when_the_served_name_is_known(tmp_path: Path):
    from inferstack.engine.weights.location import model_name
    from inferstack.stack.plan import known_model_name
    from inferstack.stack.settings import UpSettings

    auto = {"policy": "kpa", "min_replicas": 0}
    assert known_model_name(UpSettings(emulate="h100:llama-3-8b", autoscale=auto)) == \
        "meta-llama/Meta-Llama-3-8B-Instruct"
    assert known_model_name(UpSettings(model="x.gguf", autoscale=auto,
                                       engine_args=["--served-model-name", "mine"])) == "mine"
    # named the way the engine names a loaded model (the same function): alias, file stem, directory name
    assert known_model_name(UpSettings(model="smollm2-135m", autoscale=auto)) == "smollm2-135m"
    (tmp_path / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "hf-model").mkdir()
    assert known_model_name(UpSettings(model=str(tmp_path / "tiny.Q4_0.gguf"), autoscale=auto)) == "tiny.Q4_0"
    assert known_model_name(UpSettings(model=str(tmp_path / "hf-model"), autoscale=auto)) == "hf-model"
    assert model_name(str(tmp_path / "hf-model")) == "hf-model"
    # only the engine can tell: a pulled or verified copy, or a reference naming nothing (its error says why)
    assert known_model_name(UpSettings(model="oci://reg/ns/m:1", autoscale=auto)) is None
    assert known_model_name(UpSettings(model="smollm2-135m", autoscale=auto,
                                       engine_args=["--trust-policy=p.yaml"])) is None
    assert known_model_name(UpSettings(model=str(tmp_path / "missing.gguf"), autoscale=auto)) is None
