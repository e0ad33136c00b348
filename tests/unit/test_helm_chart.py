"""The packaged Helm chart, rendered by the real Helm v4 engine (helm-python-sdk) for several value
combinations; every built-in object passes kubernetes-validate (strict, Kubernetes 1.34 schemas), the
InferencePool passes its CRD's schema and CEL rules, and the picker's inferstack.yaml loads with our
own config loader. `inferstack deploy values` output renders too."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from inferstack.cli.main import app
from inferstack.config import parse_config
from inferstack.kube.pods import selected
from inferstack.kube.render import RenderError, render_chart
from inferstack.kube.values import CHART_DIR

KUBE_VERSION = "1.34.0"  # DRA resource.k8s.io/v1 is GA from 1.34
CRD = yaml.safe_load((CHART_DIR / "crds" / "inferencepool-crd-v1.yaml").read_text())
POOL_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
NO_SCHEMA = {"InferencePool", "HTTPRoute", "PodMonitor"}  # CRDs: checked below / structurally
PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"


@pytest.fixture(autouse=True, scope="module")
def _cached_schemas():
    """kubernetes-validate re-reads and re-parses its ~1 MB schema files on every call (0.5 s per render
    here); the parsed JSON is read-only, so reuse it within this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kubernetes_validate.utils, "schema_contents",
                   functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents))
        yield


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs = render_chart(values, name="llm", namespace="serving")
    objs = [o for _, text in docs for o in yaml.safe_load_all(text) if o]
    for o in objs:
        if o["kind"] in NO_SCHEMA:
            continue
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
    for pool in by_kind(objs, "InferencePool"):
        jsonschema.validate(pool, POOL_SCHEMA)
        ref = pool["spec"]["endpointPickerRef"]
        assert ref.get("kind", "Service") != "Service" or "port" in ref  # CEL: port required for a Service
        numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
        assert len(set(numbers)) == len(numbers)  # CEL: port numbers unique
    return objs


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in by_kind(objs, kind)])
    return found[0]


def engine(objs: list[dict], role: str) -> dict:
    return one(objs, "Deployment", f"llm-inferstack-{role}")["spec"]["template"]


def container(pod: dict, name: str = "engine") -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def picker_config(objs: list[dict]):
    cm = one(objs, "ConfigMap", "llm-inferstack-epp")
    return parse_config(cm["data"]["inferstack.yaml"], "epp-configmap")


def test_defaults_render_the_pool_picker_and_engines():
    objs = render({})
    pool = one(objs, "InferencePool")
    assert pool["metadata"]["name"] == "llm-inferstack"
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "llm-inferstack-epp",
                                                 "port": {"number": 9002}, "failureMode": "FailOpen"}
    # the pool selects the engine pods and nothing else
    match = pool["spec"]["selector"]["matchLabels"]
    decode = engine(objs, "decode")
    assert selected(decode["metadata"]["labels"], match)
    epp = one(objs, "Deployment", "llm-inferstack-epp")["spec"]["template"]
    assert not selected(epp["metadata"]["labels"], match)
    assert decode["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    # picker: ext_proc 9002, gRPC health 9003 (probes), metrics 9090; its config is a valid inferstack.yaml
    c = container(epp, "epp")
    assert c["command"] == ["inferstack", "epp", "serve"]
    assert {p["containerPort"] for p in c["ports"]} == {9002, 9003, 9090}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    cfg = picker_config(objs)
    assert cfg.pools["llm-inferstack"].kubernetes.inference_pool == "llm-inferstack"
    assert c["args"][c["args"].index("--pool") + 1] == "llm-inferstack"
    svc = one(objs, "Service", "llm-inferstack-epp")
    assert {p["port"] for p in svc["spec"]["ports"]} == {9002, 9003, 9090}
    # discovery RBAC: watch pods, read the pool
    rules = one(objs, "Role")["rules"]
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]} in rules
    assert any(r["resources"] == ["inferencepools"] and "watch" in r["verbs"] for r in rules)
    # engine: probes on /ready and /health, preStop drain, one GPU
    e = container(decode)
    assert e["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert e["livenessProbe"]["httpGet"]["path"] == "/health" == e["startupProbe"]["httpGet"]["path"]
    assert e["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert e["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert decode["spec"]["terminationGracePeriodSeconds"] == 45
    route = one(objs, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gateway"
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "llm-inferstack"}]
    # engines only reachable from the picker, each other and the gateway
    netpol = one(objs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"] == match
    peers = netpol["spec"]["ingress"][0]["from"]
    assert peers[0]["podSelector"]["matchLabels"] == {k: epp["metadata"]["labels"][k] for k in
                                                      ("app.kubernetes.io/instance", "app.kubernetes.io/component")}
    assert len(by_kind(objs, "PodDisruptionBudget")) == 2 and not by_kind(objs, "PodMonitor")


def test_vllm_pd_with_dra_and_an_image_volume():
    objs = render({
        "engine": {"type": "vllm"}, "prefill": {"replicas": 2, "parallelism": {"tensor": 2}},
        "decode": {"replicas": 4, "parallelism": {"tensor": 2}},
        "modelArtifacts": {"name": "meta-llama/Llama-3.1-8B", "uri": "oci://reg.example/models/llama:8b",
                           "source": "imageVolume"},
        "accelerator": {"dra": {"enabled": True, "selectors": ["device.attributes['gpu.nvidia.com'].type == 'gpu'"]}},
        "monitoring": {"podMonitor": {"enabled": True}}})
    for role in ("prefill", "decode"):
        pod = engine(objs, role)
        e = container(pod)
        assert pod["metadata"]["labels"]["llm-d.ai/role"] == role
        assert pod["metadata"]["labels"]["llm-d.ai/model"] == "meta-llama-Llama-3.1-8B"
        assert e["command"] == ["vllm", "serve"] and e["args"][0] == "/models/model"
        assert e["args"][e["args"].index("--tensor-parallel-size") + 1] == "2"
        assert "--kv-transfer-config" in e["args"] and e["readinessProbe"]["httpGet"]["path"] == "/health"
        assert {"name": "model", "image": {"reference": "reg.example/models/llama:8b", "pullPolicy": "IfNotPresent"}} \
            in pod["spec"]["volumes"]
        assert "initContainers" not in pod["spec"]
        assert pod["spec"]["resourceClaims"] == [{"name": "gpu", "resourceClaimTemplateName": "llm-inferstack-gpu"}]
        assert e["resources"] == {"claims": [{"name": "gpu"}]}  # no device-plugin limit alongside DRA
    rct = one(objs, "ResourceClaimTemplate")["spec"]["spec"]["devices"]["requests"][0]["exactly"]
    assert rct["deviceClassName"] == "gpu.nvidia.com" and rct["count"] == 2
    assert rct["selectors"] == [{"cel": {"expression": "device.attributes['gpu.nvidia.com'].type == 'gpu'"}}]
    pm = one(objs, "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http", "metrics"]
    assert picker_config(objs).pools["llm-inferstack"].pd.enabled  # PD pods → a PD pool in the picker
    assert len(by_kind(objs, "PodDisruptionBudget")) == 3


def test_sglang_pd_with_hami_and_a_verified_init_container():
    objs = render({
        "engine": {"type": "sglang"}, "prefill": {"replicas": 1},
        "modelArtifacts": {"uri": "oci://reg.example/models/qwen:1", "trust": {"publicKeys": {"team.pem": PEM}}},
        "accelerator": {"hami": {"enabled": True, "gpumem": 8000, "gpucores": 50, "useGpuType": "A100",
                                 "schedulerPolicy": "binpack"}},
        "decode": {"nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}})
    pod = engine(objs, "prefill")
    e = container(pod)
    assert e["command"] == ["python3", "-m", "sglang.launch_server"]
    assert e["args"][e["args"].index("--disaggregation-mode") + 1] == "prefill"
    assert e["args"][e["args"].index("--model-path") + 1] == "/models/model"
    assert e["resources"]["limits"] == {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 8000, "nvidia.com/gpucores": 50}
    assert pod["metadata"]["annotations"] == {"nvidia.com/use-gputype": "A100",
                                              "hami.io/gpu-scheduler-policy": "binpack"}
    decode = engine(objs, "decode")
    assert decode["spec"]["nodeSelector"] == {"gpu": "a100"} and decode["spec"]["tolerations"][0]["key"] == "gpu"
    init = pod["spec"]["initContainers"][0]
    script = init["args"][0]
    assert 'inferstack model pull "$MODEL_REF" --store "$INFERSTACK_MODEL_STORE"' in script
    assert 'inferstack model verify "$path" --public-key /etc/inferstack/trust/team.pem\n' in script
    assert {"name": "MODEL_REF", "value": "reg.example/models/qwen:1"} in init["env"]
    subprocess.run(["sh", "-n", "-c", script], check=True)  # the shell parses it
    trust = one(objs, "ConfigMap", "llm-inferstack-trust")["data"]
    assert trust["team.pem"] == PEM
    policy = yaml.safe_load(trust["policy.yaml"])
    assert policy["trusted_keys"] == ["/etc/inferstack/trust/team.pem"] and policy["require_signature"] is True


def test_inferstack_pvc_model_on_cpu_with_pins():
    objs = render({"modelArtifacts": {"name": "smol", "uri": "pvc://models/smollm2/q4.gguf"},
                   "accelerator": {"type": "cpu"}, "engine": {"extraArgs": ["--max-num-seqs", "8"]},
                   "networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
                   "httpRoute": {"enabled": False}})
    pod = engine(objs, "decode")
    e = container(pod)
    assert e["args"][e["args"].index("--model") + 1] == "/models/smollm2/q4.gguf"
    assert e["args"][-2:] == ["--max-num-seqs", "8"] and "--device" not in e["args"] and "resources" not in e
    assert ({"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
            in pod["spec"]["volumes"])
    assert not by_kind(objs, "NetworkPolicy") and not by_kind(objs, "PodDisruptionBudget")
    assert not by_kind(objs, "HTTPRoute")


def test_pinned_digest_replaces_the_tag():
    objs = render({"modelArtifacts": {"uri": "oci://reg.example/m/a:1", "trust": {
        "publicKeys": {"k.pem": PEM}, "pinnedDigests": {"reg.example/m/a:1": "sha256:" + "ab" * 32},
        "requireDigest": True, "allowedRegistries": ["reg.example"]}}})
    init = engine(objs, "decode")["spec"]["initContainers"][0]
    assert {"name": "MODEL_REF", "value": "reg.example/m/a@sha256:" + "ab" * 32} in init["env"]


@pytest.mark.parametrize(("values", "message"), [
    ({"modelArtifacts": {"uri": "oci://reg.example/m:1"}}, "needs publicKeys or certChains"),
    ({"modelArtifacts": {"uri": "oci://evil.example/m:1", "trust": {
        "allowedRegistries": ["reg.example"], "allowUnverified": True}}}, 'registry "evil.example" is not in'),
    ({"modelArtifacts": {"uri": "oci://reg.example/m:1", "trust": {"requireDigest": True, "allowUnverified": True}}},
     "requires a digest-pinned reference"),
    ({"modelArtifacts": {"uri": "hf://org/model"}}, "hf:// is for vLLM/SGLang"),
    # values.schema.json: Helm checks values before any template runs
    ({"engine": {"type": "tgi"}}, "at '/engine/type': value must be one of 'inferstack', 'vllm', 'sglang'"),
    ({"decode": {"replica": 2}}, "at '/decode': additional properties 'replica' not allowed"),
    ({"accelerator": {"hami": {"gpucores": 150}}}, "at '/accelerator/hami/gpucores': maximum: got 150, want 100"),
])
def test_unsafe_or_wrong_values_fail_the_render(values, message):
    with pytest.raises(RenderError) as exc:
        render(values)
    assert message in str(exc.value)


def test_deploy_values_from_the_local_config_renders(tmp_path, capsys):
    (tmp_path / "pub.pem").write_text(PEM)
    (tmp_path / "inferstack.yaml").write_text("""
up:
  model: oci://registry.example.com/models/smollm2:1.0
  pd: {prefill: 1, decode: 2, threshold_tokens: 64}
  kv_transport: tcp
pools:
  chat:
    endpoints: [http://127.0.0.1:8001]
    routing: cache-aware
    max_concurrency: 8
  other:
    endpoints: [http://127.0.0.1:8002]
models:
  smollm2: {aliases: [small], targets: [{pool: chat}]}
  split: {targets: [{pool: chat, model: smollm2}, {pool: other}]}
objectives: {batch: {priority: -1}}
tenants: {acme: {rpm: 600}}
gateway: {port: 9000, flow_control: {max_queued: 500}}
trust: {trusted_keys: [pub.pem], allowed_registries: [registry.example.com]}
""")
    out = tmp_path / "values.yaml"
    from typer.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(app, ["deploy", "values", "--config", str(tmp_path / "inferstack.yaml"), "--out", str(out)])
    assert r.exit_code == 1 and "choose one with --pool" in r.output
    r = runner.invoke(app, ["deploy", "values", "-c", str(tmp_path / "inferstack.yaml"), "--pool", "chat",
                            "--out", str(out), "--gateway", "gw"])
    assert r.exit_code == 0, r.output
    values = yaml.safe_load(out.read_text())
    assert values["modelArtifacts"]["trust"]["publicKeys"] == {"pub.pem": PEM}
    objs = render(values)
    cfg = picker_config(objs)
    pool = cfg.pools["chat"]
    assert (pool.routing, pool.max_concurrency, pool.pd.threshold_tokens) == ("cache-aware", 8, 64)
    assert cfg.objectives["batch"].priority == -1 and cfg.tenants["acme"].rpm == 600
    assert cfg.gateway.flow_control.max_queued == 500 and cfg.gateway.port == 8080  # local port not carried
    assert [t.pool for t in cfg.models["split"].targets] == ["chat"]  # only this pool's targets
    assert [one(objs, "Deployment", f"llm-inferstack-{r}")["spec"]["replicas"] for r in ("prefill", "decode")] == [1, 2]
    for role in ("prefill", "decode"):
        args = container(engine(objs, role))["args"]
        assert args[args.index("--kv-transport") + 1] == "tcp"
    assert one(objs, "HTTPRoute")["spec"]["parentRefs"][0]["name"] == "gw"
    r = runner.invoke(app, ["deploy", "render", "-c", str(tmp_path / "inferstack.yaml"), "--pool", "chat"])
    assert r.exit_code == 0 and "kind: InferencePool" in r.output
    r = runner.invoke(app, ["deploy", "values", "-c", str(tmp_path / "inferstack.yaml"), "--pool", "chat",
                            "--engine", "vllm", "--model-uri", "smollm2-135m"])
    assert r.exit_code == 1 and "needs an oci://, pvc:// or hf:// model" in r.output


def test_helm_lint_is_clean():
    import helm_python as helm

    report = helm.lint(str(CHART_DIR), strict=True)
    assert report["errors"] == [] and all(m["severity"] <= 1 for m in report["messages"]), report


def test_deploy_values_for_an_emulated_stack_render_cpu_engines():
    from inferstack.kube.values import chart_values

    values = chart_values(parse_config("up: {emulate: 'h100:llama-3-8b', replicas: 3}\n"), Path("."))
    assert values["modelArtifacts"]["name"] == "llama-3-8b" and values["inferencePool"]["name"] == "default"
    e = container(engine(render(values), "decode"))
    assert e["args"][:4] == ["--emulate", "h100:llama-3-8b", "--served-model-name", "llama-3-8b"]
    assert "resources" not in e and "--device" not in e["args"]
