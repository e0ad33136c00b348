"""The whole supply chain through the real CLI and a real registry:
pack -> push -> sign (from layer digests, signature pushed as a referrer) -> pull elsewhere -> verify ->
load gate via oci:// -> tamper -> refused -> compliance report."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.compliance.audit import AuditLog
from inferstack.compliance.config import AuditConfig
from inferstack.modelhub.errors import ModelVerificationError
from inferstack.modelhub.gate import verify_before_load
from inferstack.modelhub.policy import TrustPolicy
from inferstack.modelhub.resolve import resolve_model_ref
from inferstack.modelhub.store import Store
from support.modelhub_fixtures import (
    DOCKER_REGISTRY,
    Registry,
    start_registry,
    tiny_hf_model,
    write_ec_keypair,
)
from support.procs import inferstack_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(DOCKER_REGISTRY).exists(), reason="docker-registry not installed")]


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """The real command in its own process (the steps a pipeline runs)."""
    r = subprocess.run([sys.executable, "-m", "inferstack", *args], capture_output=True, text=True,
                       env=inferstack_env(), timeout=120)
    assert r.returncode == expect, f"{args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def cli_inproc(*args: str, expect: int = 0) -> Result:
    """The same command in this process (cheaper, for the read-only steps)."""
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == expect, f"{args}: rc={r.exit_code}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = start_registry()
    yield reg
    reg.stop()


def test_pack_push_sign_pull_verify_gate_report(tmp_path: Path, registry: Registry) -> None:
    model = tiny_hf_model(tmp_path / "model")
    priv, pub = write_ec_keypair(tmp_path / "keys", "signer")
    _, other_pub = write_ec_keypair(tmp_path / "keys", "other")
    ref = f"{registry.host}/models/tiny:v1"
    builder = str(tmp_path / "builder-store")
    cli("model", "pack", str(model), "-t", ref, "--store", builder, "--dataset", "https://example.org/d")
    cli("model", "push", ref, "--store", builder, "--plain-http")
    signed = cli("model", "sign", ref, "--key", str(priv), "--store", builder, "--plain-http")
    assert "from its layer digests" in signed.stdout and "registry" in signed.stdout

    # Metadata of a remote model, without downloading its layers.
    remote = json.loads(cli_inproc("model", "inspect", ref, "--store", str(tmp_path / "peek"), "--plain-http", "--show",
                            "aibom").stdout)
    assert remote[0]["specVersion"] == "1.6"
    assert not list((tmp_path / "peek" / "models").iterdir())

    # A different machine: fresh store, pulls by tag; the signature comes along as a referrer.
    consumer = str(tmp_path / "consumer-store")
    pulled = cli("model", "pull", ref, "--store", consumer, "--plain-http")
    assert "3 referrers" in pulled.stdout  # signature, SLSA provenance, ML-BOM
    ok = cli("model", "verify", ref, "--public-key", str(pub), "--store", consumer, "--json")
    assert json.loads(ok.stdout)["status"] == "verified"
    wrong = cli_inproc("model", "verify", ref, "--public-key", str(other_pub), "--store", consumer, expect=1)
    assert "Key mismatch" in wrong.stderr
    listed = json.loads(cli_inproc("model", "list", "--store", consumer, "--json").stdout)
    assert listed[0]["reference"] == ref and len(listed[0]["referrers"]) == 3
    inspected = json.loads(cli_inproc("model", "inspect", ref, "--store", consumer, "--show", "config").stdout)
    assert inspected["config"]["architecture"] == "llama"

    # The engine's entry point: oci:// -> verified local path (policy from config), audited.
    store = Store(Path(consumer))
    policy = TrustPolicy(trusted_keys=[pub], allowed_registries=[registry.host])
    path = resolve_model_ref(f"oci://{ref}", policy, store=store)
    assert (path / "model.safetensors").is_file()
    with pytest.raises(ModelVerificationError, match="allowed_registries"):
        resolve_model_ref(f"oci://{ref}", TrustPolicy(trusted_keys=[pub], allowed_registries=["other:5000"]),
                          store=store)

    # Tamper with the pulled bytes: verify and the gate refuse, naming the file.
    (path / "config.json").chmod(0o644)
    (path / "config.json").write_text('{"model_type": "evil"}')
    bad = cli("model", "verify", ref, "--public-key", str(pub), "--store", consumer, expect=1)
    assert "config.json" in bad.stderr and "hash mismatch" in bad.stderr
    audit_dir = tmp_path / "audit"
    with AuditLog(AuditConfig(directory=audit_dir, fsync=False)) as audit, pytest.raises(ModelVerificationError):
        verify_before_load(path, policy, audit=audit)

    # An unsigned model under a require-signature policy is refused by the gate too.
    unsigned_ref = f"{registry.host}/models/unsigned:v1"
    cli_inproc("model", "pack", str(tiny_hf_model(tmp_path / "u", seed=1)), "-t", unsigned_ref, "--store", builder)
    cli_inproc("model", "push", unsigned_ref, "--store", builder, "--plain-http")
    with pytest.raises(ModelVerificationError, match="unsigned"):
        resolve_model_ref(f"oci://{unsigned_ref}", policy, store=store)

    # Compliance report over both models and the audit log.
    (tmp_path / "policy.yaml").write_text(f"trusted_keys: [{pub}]\nrequire_signature: true\n")
    report = cli_inproc("compliance", "report", "--model", ref, "--model", unsigned_ref, "--policy",
                 str(tmp_path / "policy.yaml"), "--audit-dir", str(audit_dir), "--store", consumer, "--format",
                 "json")
    data = json.loads(report.stdout)
    statuses = {m["reference"]: m["signature_status"] for m in data["models"]}
    assert statuses == {ref: "failed", unsigned_ref: "unsigned"}
    assert data["logging"]["chain"]["ok"] is True and data["logging"]["verification_events"] == 1
    items = {i["article"]: i["status"] for i in data["checklist"]}
    assert items["Art. 15(4) / supply chain"] == "fail" and items["Art. 19(1) / 26(6)"] == "pass"
    md = cli_inproc("compliance", "report", "--model", ref, "--policy", str(tmp_path / "policy.yaml"), "--store",
             consumer, "--strict", expect=1)
    assert "| Art. 12(1) |" in md.stdout
    cli_inproc("compliance", "verify-log", str(audit_dir))
