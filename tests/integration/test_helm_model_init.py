"""The chart's model init container, run for real: its rendered shell script pulls a signed ModelPack
from a real registry (Debian's docker-registry) with `inferstack model pull`, verifies it with
`inferstack model verify` against the trust policy's key, and links it where the engine loads it;
with a key that did not sign the model it exits non-zero before anything is linked (fail closed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.kube.render import render_chart
from support.modelhub_fixtures import start_registry, tiny_hf_model, write_ec_keypair
from support.procs import inferstack_env


def _init_script(ref: str, mount: Path, keys: dict[str, str]) -> tuple[str, dict[str, str]]:
    values = {"modelArtifacts": {"uri": f"oci://{ref}", "mountPath": str(mount), "plainHTTP": True,
                                 "trust": {"publicKeys": keys}}}
    docs = dict(render_chart(values, name="t", namespace="ns"))
    deploy = next(d for d in yaml.safe_load_all(docs["inferstack/templates/engine-deployment.yaml"]) if d)
    init = deploy["spec"]["template"]["spec"]["initContainers"][0]
    return init["args"][0], {e["name"]: e["value"] for e in init["env"] if "value" in e}


def _run(script: str, env: dict[str, str], trust_dir: Path) -> subprocess.CompletedProcess:
    # the pod mounts the trust ConfigMap at /etc/inferstack/trust; here it is a directory of ours
    script = script.replace("/etc/inferstack/trust", str(trust_dir))
    bin_dir = str(Path(sys.executable).parent)
    full_env = inferstack_env(**env, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(["sh", "-c", script], env=full_env, capture_output=True, text=True, timeout=120)


def test_init_container_pulls_verifies_and_fails_closed(tmp_path):
    reg = start_registry()
    try:
        priv, pub = write_ec_keypair(tmp_path / "keys", "signer")
        _, other = write_ec_keypair(tmp_path / "keys", "other")
        ref = f"{reg.host}/models/tiny:v1"
        builder = str(tmp_path / "builder")
        runner = CliRunner()
        for args in (["pack", str(tiny_hf_model(tmp_path / "m")), "-t", ref, "--store", builder],
                     ["push", ref, "--store", builder, "--plain-http"],
                     ["sign", ref, "--key", str(priv), "--store", builder, "--plain-http"]):
            r = runner.invoke(app, ["model", *args])
            assert r.exit_code == 0, r.output

        for name, key, mount in (("good", pub, tmp_path / "pod-a"), ("wrong", other, tmp_path / "pod-b")):
            trust = tmp_path / f"trust-{name}"
            trust.mkdir()
            (trust / "signer.pem").write_text(key.read_text())
            mount.mkdir()
            script, env = _init_script(ref, mount, {"signer.pem": key.read_text()})
            assert env["MODEL_REF"] == ref and env["INFERSTACK_MODEL_STORE"] == f"{mount}/store"
            r = _run(script, env, trust)
            if name == "good":
                assert r.returncode == 0, r.stdout + r.stderr
                assert (mount / "model").is_symlink() and (mount / "model" / "model.safetensors").is_file()
                assert "verified" in r.stdout
            else:
                assert r.returncode != 0 and "Key mismatch" in r.stderr, r.stdout + r.stderr
                assert not (mount / "model").exists()  # nothing for the engine to load
    finally:
        reg.stop()
