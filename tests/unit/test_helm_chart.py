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
NO_SCHEMA = {"InferencePool", "HTTPRoute", "PodMonitor", "ScaledObject"}  # CRDs: checked below / structurally
# KEDA's own CRD (tests/data/README.md says where it comes from)
KEDA_CRD = yaml.safe_load((Path(__file__).parents[1] / "data" / "keda" / "keda.sh_scaledobjects.yaml").read_text())
SCALED_OBJECT_SCHEMA = KEDA_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
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
    for so in by_kind(objs, "ScaledObject"):
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
        spec = so["spec"]  # the CRD's CEL rule: minReplicaCount <= maxReplicaCount
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
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


def test_several_pickers_elect_a_leader():
    """One picker: every replica routes, no Lease rights. Several: `--leader-election`, the pod's name
    and namespace for its identity, and the Lease verbs client-go's algorithm needs."""
    single = render({})
    c = container(one(single, "Deployment", "llm-inferstack-epp")["spec"]["template"], "epp")
    assert "--leader-election" not in c["args"]
    assert not any(r["resources"] == ["leases"] for r in one(single, "Role")["rules"])
    objs = render({"inferenceExtension": {"replicas": 3}})
    epp = one(objs, "Deployment", "llm-inferstack-epp")
    c = container(epp["spec"]["template"], "epp")
    assert epp["spec"]["replicas"] == 3 and "--leader-election" in c["args"]
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "verbs": ["get", "create", "update", "patch"]} in one(objs, "Role")["rules"]
def test_autoscaling_hpa_per_role_on_ai_metrics():
    objs = render({"prefill": {"replicas": 1}, "autoscaling": {"mode": "hpa", "minReplicas": 1, "maxReplicas": 6}})
    for role in ("prefill", "decode"):
        hpa = one(objs, "HorizontalPodAutoscaler", f"llm-inferstack-{role}")["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": f"llm-inferstack-{role}"}
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 6)
        pods, ext = hpa["metrics"]
        assert pods["pods"] == {"metric": {"name": "vllm_num_requests_running"},
                                "target": {"type": "AverageValue", "averageValue": "8"}}
        assert ext["external"]["metric"] == {"name": "inferstack_gateway_queue_depth",
                                             "selector": {"matchLabels": {"pool": "llm-inferstack"}}}
        assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
        # the HPA owns the replicas: the Deployment leaves them out so `helm upgrade` does not reset them
        assert "replicas" not in one(objs, "Deployment", f"llm-inferstack-{role}")["spec"]
    assert not by_kind(objs, "ScaledObject") and not picker_config(objs).pools["llm-inferstack"].kubernetes.autoscale
    assert all(r["resources"] != ["deployments/scale"] for r in one(objs, "Role")["rules"])


def test_autoscaling_keda_scales_to_zero_on_a_single_element_query():
    objs = render({"autoscaling": {"mode": "keda", "minReplicas": 0, "maxReplicas": 5, "keda": {
        "serverAddress": "http://prometheus.monitoring:9090", "activationThreshold": "0.5"}}})
    so = one(objs, "ScaledObject", "llm-inferstack-decode")["spec"]
    assert (so["minReplicaCount"], so["maxReplicaCount"], so["cooldownPeriod"]) == (0, 5, 300)
    (trigger,) = so["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus.monitoring:9090", "threshold": "8", "activationThreshold": "0.5",
        "ignoreNullValues": "true",
        "query": 'sum(inferstack_gateway_in_flight{pool="llm-inferstack"}) + '
                 'sum(inferstack_gateway_queue_depth{pool="llm-inferstack"})'}
    assert not by_kind(objs, "HorizontalPodAutoscaler")
    assert "replicas" not in one(objs, "Deployment", "llm-inferstack-decode")["spec"]


def test_autoscaling_epp_mode_configures_the_picker_and_its_rbac():
    objs = render({"prefill": {"replicas": 1}, "autoscaling": {
        "mode": "epp", "minReplicas": 0, "maxReplicas": 3, "epp": {"policy": "slo:ttft_p95=1s,tpot_p95=100ms"}}})
    auto = picker_config(objs).pools["llm-inferstack"].kubernetes.autoscale
    assert auto.deployments == {"prefill": "llm-inferstack-prefill", "decode": "llm-inferstack-decode"}
    assert (auto.policy, auto.min_replicas, auto.max_replicas, auto.interval_s) == (
        "slo:ttft_p95=1s,tpot_p95=100ms", 0, 3, 15)
    rule = next(r for r in one(objs, "Role")["rules"] if r["resources"] == ["deployments/scale"])
    assert rule == {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "update", "patch"],
                    "resourceNames": ["llm-inferstack-prefill", "llm-inferstack-decode"]}
    assert not by_kind(objs, "HorizontalPodAutoscaler") and not by_kind(objs, "ScaledObject")


@pytest.mark.parametrize(("values", "message"), [
    ({"mode": "keda"}, "autoscaling.mode=keda needs autoscaling.keda.serverAddress"),
    ({"mode": "keda", "keda": {"serverAddress": "http://p:9090", "query": "inferstack_gateway_in_flight"}},
     "autoscaling.keda.query must return a single element"),
    ({"mode": "hpa", "minReplicas": 0}, "minReplicas must be >= 1 (the HPA cannot scale to zero"),
    ({"mode": "hpa", "minReplicas": 5, "maxReplicas": 2}, "autoscaling: minReplicas 5 > maxReplicas 2"),
    ({"mode": "kpa"}, "at '/autoscaling/mode': value must be one of 'none', 'epp', 'hpa', 'keda'"),
    ({"mode": "epp", "epp": {"policy": "cpu:target=50"}}, "at '/autoscaling/epp/policy'"),
])
def test_autoscaling_wrong_values_fail_the_render(values, message):
    with pytest.raises(RenderError) as exc:
        render({"autoscaling": values})
    assert message in str(exc.value)
def test_agents_deployment_serves_the_validated_manifests(tmp_path):
    from inferstack.agents.manifest import load_bundle

    example = Path(__file__).resolve().parents[2] / "src/inferstack/assets/agents/glossary-team.yaml"
    objs = render({"agents": {"enabled": True, "gatewayUrl": "http://inference-gateway.serving.svc/v1",
                              "manifests": example.read_text(), "mcp": ["glossary=http://glossary.tools.svc/mcp"],
                              "firstToolChoice": "required"}})
    config = one(objs, "ConfigMap", "llm-inferstack-agents")
    (tmp_path / "agents.yaml").write_text(config["data"]["agents.yaml"])
    assert {a.name for a in load_bundle([tmp_path / "agents.yaml"]).agents()} == {"explainer", "researcher"}
    pod = one(objs, "Deployment", "llm-inferstack-agents")["spec"]["template"]
    agents = container(pod, "agents")
    assert agents["command"] == ["inferstack", "agent", "serve"]
    assert agents["args"][:3] == ["/etc/inferstack/agents/agents.yaml", "--gateway",
                                  "http://inference-gateway.serving.svc/v1"]
    assert agents["args"][-3:] == ["required", "--mcp", "glossary=http://glossary.tools.svc/mcp"]
    service = one(objs, "Service", "llm-inferstack-agents")
    assert selected(pod["metadata"]["labels"], service["spec"]["selector"])
    assert all(o["metadata"]["name"] != "llm-inferstack-agents" for o in render({}))  # off by default
    with pytest.raises(RenderError, match=r"agents\.gatewayUrl is required"):
        render_chart({"agents": {"enabled": True, "manifests": "x: 1"}}, name="llm", namespace="serving")


def test_cross_replica_kv_reuse_wires_engines_secret_and_picker_discovery():
    digest = "cd" * 32
    objs = render({"accelerator": {"type": "cpu"},
                   "engines": {"inferstack": {"kvReuse": True, "kvTransferSecret": "kv-secret", "kvEventsPort": 5600}},
                   "inferenceExtension": {"poolConfig": {"precise_prefix": {"model_digest": digest}}}})
    e = container(engine(objs, "decode"))
    args = e["args"]
    assert "--kv-reuse" in args and args[args.index("--kv-transfer-port") + 1] == "8100"
    assert args[args.index("--kv-events-endpoint") + 1] == "tcp://*:5600"
    assert {(p["name"], p["containerPort"]) for p in e["ports"]} >= {("kv-transfer", 8100), ("kv-events", 5600)}
    secret_env = {"name": "INFERSTACK_KV_TRANSFER_SECRET",
                  "valueFrom": {"secretKeyRef": {"name": "kv-secret", "key": "secret"}}}
    assert secret_env in e["env"]
    assert secret_env in container(one(objs, "Deployment", "llm-inferstack-epp")["spec"]["template"], "epp")["env"]
    pool = picker_config(objs).pools["llm-inferstack"]
    assert (pool.kubernetes.kv_events_port, pool.kubernetes.kv_transfer_port) == (5600, 8100)
    assert pool.precise_prefix.model_digest == digest and pool.precise_prefix.direct_reads
    plain = container(engine(render({"accelerator": {"type": "cpu"}}), "decode"))
    assert "--kv-reuse" not in plain["args"] and "env" not in plain


@pytest.mark.parametrize(("values", "message"), [
    ({"engines": {"inferstack": {"kvReuse": True}},
      "inferenceExtension": {"poolConfig": {"precise_prefix": {"model_digest": "cd" * 32}}}},
     "kvReuse needs engines.inferstack.kvTransferSecret"),
    ({"engines": {"inferstack": {"kvReuse": True, "kvTransferSecret": "s"}}}, "needs inferenceExtension.poolConfig"),
    ({"engines": {"inferstack": {"kvReuse": True, "kvTransferSecret": "s"}}, "prefill": {"replicas": 1},
      "inferenceExtension": {"poolConfig": {"precise_prefix": {"model_digest": "cd" * 32}}}}, "aggregated pods"),
])
def test_kv_reuse_without_what_it_needs_fails_the_render(values, message):
    with pytest.raises(RenderError) as exc:
        render(values)
    assert message in str(exc.value)


def test_deploy_values_carry_up_kv_reuse_and_render(tmp_path):
    from inferstack.kube.values import ValuesError, chart_values

    pool = "pools:\n  default:\n    endpoints: [http://127.0.0.1:8001]\n"
    cfg = parse_config("up: {kv_reuse: true}\n" + pool + f"    precise_prefix: {{model_digest: '{'ef' * 32}'}}\n")
    values = chart_values(cfg, tmp_path)
    assert values["engines"]["inferstack"] == {"kvReuse": True, "kvTransferSecret": "inferstack-kv-transfer"}
    args = container(engine(render({**values, "accelerator": {"type": "cpu"}}), "decode"))["args"]
    assert "--kv-reuse" in args
    with pytest.raises(ValuesError, match=r"needs pools\.default\.precise_prefix"):
        chart_values(parse_config("up: {kv_reuse: true}\n" + pool), tmp_path)
