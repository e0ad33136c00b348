"""The CLI shape scripts rely on: sign PATH --key, verify PATH --public-key | --cert-chain; exit 0 only on success."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from inferstack.cli.main import app
from support.modelhub_fixtures import tiny_hf_model, write_cert_chain, write_ec_keypair

runner = CliRunner()


def test_sign_and_verify_a_folder_with_a_key(tmp_path: Path) -> None:
    model = tiny_hf_model(tmp_path / "m")
    priv, pub = write_ec_keypair(tmp_path / "k")
    assert runner.invoke(app, ["model", "sign", str(model), "--key", str(priv)]).exit_code == 0
    assert (model / "model.sig").is_file()
    ok = runner.invoke(app, ["model", "verify", str(model), "--public-key", str(pub)])
    assert ok.exit_code == 0 and "verified" in ok.output
    (model / "README.md").write_text("changed")
    bad = runner.invoke(app, ["model", "verify", str(model), "--public-key", str(pub)])
    assert bad.exit_code == 1 and "README.md" in bad.output


def test_certificate_chain_flags(tmp_path: Path) -> None:
    model = tiny_hf_model(tmp_path / "m")
    chain = write_cert_chain(tmp_path / "pki")
    res = runner.invoke(app, ["model", "sign", str(model), "--key", str(chain.leaf_key), "--cert",
                              str(chain.leaf_cert), "--cert-chain", str(chain.ca_cert)])
    assert res.exit_code == 0, res.output
    ok = runner.invoke(app, ["model", "verify", str(model), "--cert-chain", str(chain.ca_cert), "--json"])
    assert ok.exit_code == 0 and '"status": "verified"' in ok.output


def test_usage_errors(tmp_path: Path) -> None:
    model = tiny_hf_model(tmp_path / "m")
    assert runner.invoke(app, ["model", "verify", str(model)]).exit_code == 2
    res = runner.invoke(app, ["model", "sign", str(model), "--key", str(tmp_path / "missing.pem")])
    assert res.exit_code == 1 and "not found" in res.output
    res = runner.invoke(app, ["model", "pull", "not-a-ref"])
    assert res.exit_code == 1 and "registry host" in res.output
    res = runner.invoke(app, ["model", "pack", str(tmp_path / "nope"), "-t", "h.io/m/x:v1", "--store",
                              str(tmp_path / "s")])
    assert res.exit_code == 1 and "does not exist" in res.output
