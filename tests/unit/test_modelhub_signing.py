"""Signing, verification and the load gate: the tamper matrix, keys, certificates, interop with model_signing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inferstack.modelhub.attest import layer_digests, sign_manifest
from inferstack.modelhub.errors import ModelVerificationError, SigningError
from inferstack.modelhub.gate import verify_before_load
from inferstack.modelhub.pack import pack
from inferstack.modelhub.policy import TrustPolicy
from inferstack.modelhub.reference import parse_reference
from inferstack.modelhub.signing import SignerSpec, hash_files, model_files, sign_path
from inferstack.modelhub.store import Store
from support.modelhub_fixtures import tiny_hf_model, write_cert_chain, write_ec_keypair


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = write_ec_keypair(d, "good")
    other_priv, other_pub = write_ec_keypair(d, "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


def _signed_model(tmp_path: Path, keys: dict[str, Path], algorithm: str = "sha256") -> Path:
    model = tiny_hf_model(tmp_path / "model")
    (model / "model.sig").write_bytes(sign_path(model, SignerSpec(keys["priv"]), algorithm))
    return model


def _policy(keys: dict[str, Path], **kw) -> TrustPolicy:
    return TrustPolicy(trusted_keys=[keys["pub"]], **kw)


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_signed_model_verifies(tmp_path: Path, keys: dict[str, Path], algorithm: str) -> None:
    model = _signed_model(tmp_path, keys, algorithm)
    report = verify_before_load(model, _policy(keys))
    assert report.status == "verified" and report.algorithm == algorithm and report.files == 4
    assert report.key_fingerprint and report.root_digest.startswith("sha256:")


TAMPER = {
    "modified": (lambda m: (m / "config.json").write_text('{"model_type": "evil"}'), "config.json", "hash mismatch"),
    "flipped byte": (
        lambda m: (m / "model.safetensors").write_bytes(
            (b := bytearray((m / "model.safetensors").read_bytes())) and bytes(b[:-1] + bytes([b[-1] ^ 1]))),
        "model.safetensors", "hash mismatch"),
    "added": (lambda m: (m / "extra.bin").write_bytes(b"x"), "extra.bin", "added"),
    "deleted": (lambda m: (m / "tokenizer.json").unlink(), "tokenizer.json", "missing"),
    "added in subfolder": (lambda m: ((m / "sub").mkdir(), (m / "sub" / "x.py").write_text("1")), "sub/x.py", "added"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tamper_matrix_fails_closed_naming_the_file(tmp_path: Path, keys: dict[str, Path], case: str) -> None:
    model = _signed_model(tmp_path, keys)
    change, name, words = TAMPER[case]
    change(model)
    with pytest.raises(ModelVerificationError) as e:
        verify_before_load(model, _policy(keys))
    assert name in str(e.value) and words in str(e.value)
    assert e.value.files == [name]


def test_wrong_key_unsigned_and_policy(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = _signed_model(tmp_path, keys)
    with pytest.raises(ModelVerificationError, match=r"no signature .* trusted key.*Key mismatch"):
        verify_before_load(model, TrustPolicy(trusted_keys=[keys["other_pub"]]))
    (model / "model.sig").unlink()
    with pytest.raises(ModelVerificationError, match=r"unsigned.*requires a signature"):
        verify_before_load(model, _policy(keys))
    assert verify_before_load(model, TrustPolicy(require_signature=False)).status == "unsigned-allowed"
    with pytest.raises(ModelVerificationError, match="lists no trusted_keys"):
        verify_before_load(_signed_model(tmp_path / "b", keys), TrustPolicy())
    (model / "model.sig").write_text("{not json")
    with pytest.raises(ModelVerificationError, match="not a valid Sigstore bundle"):
        verify_before_load(model, _policy(keys))


def test_allow_unsigned_files_and_engine_digest_caches(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = _signed_model(tmp_path, keys)
    cache = model / "model.safetensors.sha256"
    cache.write_text("123:456 abc\n")  # a digest cache names the model's digest: unsigned, so removed
    assert verify_before_load(model, _policy(keys)).status == "verified"
    assert not cache.exists()
    (model / "notes.txt").write_text("x")
    with pytest.raises(ModelVerificationError):
        verify_before_load(model, _policy(keys))
    assert verify_before_load(model, _policy(keys, allow_unsigned_files=True)).files == 4


@pytest.mark.parametrize("extra", [".git/hooks/post-checkout", ".gitattributes", ".github/x.yml"])
def test_vcs_metadata_inside_a_verified_model_is_refused(tmp_path: Path, keys: dict[str, Path], extra: str) -> None:
    """Issue 19 item 9: the OMS defaults skip VCS paths when hashing, so they could hide unsigned files."""
    model = _signed_model(tmp_path, keys)
    (model / extra).parent.mkdir(parents=True, exist_ok=True)
    (model / extra).write_text("#!/bin/sh\n")
    with pytest.raises(ModelVerificationError, match="no signature covers") as e:
        verify_before_load(model, _policy(keys))
    assert e.value.files == [extra]
    assert verify_before_load(model, _policy(keys, allow_unsigned_files=True)).status == "verified"


def test_single_file_model(tmp_path: Path, keys: dict[str, Path]) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    f.with_name("m.gguf.sig").write_bytes(sign_path(f, SignerSpec(keys["priv"])))
    assert verify_before_load(f, _policy(keys)).files == 1
    f.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    with pytest.raises(ModelVerificationError, match="hash mismatch"):
        verify_before_load(f, _policy(keys))


def test_certificate_chain(tmp_path: Path, keys: dict[str, Path]) -> None:
    chain = write_cert_chain(tmp_path / "pki")
    model = tiny_hf_model(tmp_path / "model")
    spec = SignerSpec(chain.leaf_key, certificate=chain.leaf_cert, chain=(chain.ca_cert,))
    (model / "model.sig").write_bytes(sign_path(model, spec))
    report = verify_before_load(model, TrustPolicy(trusted_cert_chains=[chain.ca_cert]))
    assert report.signer.startswith("certificate:")
    other = write_cert_chain(tmp_path / "pki2")
    with pytest.raises(ModelVerificationError, match="trusted key or certificate"):
        verify_before_load(model, TrustPolicy(trusted_cert_chains=[other.ca_cert]))


def test_signing_a_packed_model_reuses_layer_digests(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = tiny_hf_model(tmp_path / "model")
    store = Store(tmp_path / "store")
    res = pack(model, parse_reference("127.0.0.1:1/m/tiny:v1"), store)
    digests = layer_digests(res.manifest)
    root, rels = model_files(model)
    assert digests == hash_files(root, rels, "sha256")  # a raw layer digest *is* the file's sha256
    bundle = sign_manifest(res.manifest, "tiny", SignerSpec(keys["priv"]))
    (model / "model.sig").write_bytes(bundle)
    assert verify_before_load(model, _policy(keys)).files == len(rels)


def test_empty_model_and_bad_key_are_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SigningError, match="empty"):
        sign_path(tmp_path / "empty", SignerSpec(keys["priv"]))
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(SigningError):
        sign_path(tiny_hf_model(tmp_path / "m"), SignerSpec(tmp_path / "bad.pem"))


@pytest.mark.skipif(shutil.which("model_signing", path=str(Path(sys.executable).parent)) is None,
                    reason="model_signing CLI not installed")
def test_interop_with_the_model_signing_cli(tmp_path: Path, keys: dict[str, Path]) -> None:
    cli = str(Path(sys.executable).parent / "model_signing")
    ours = _signed_model(tmp_path / "a", keys)
    sig = tmp_path / "ours.sig"
    shutil.move(ours / "model.sig", sig)
    r = subprocess.run([cli, "verify", "key", str(ours), "--signature", str(sig), "--public_key", str(keys["pub"])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    theirs = tiny_hf_model(tmp_path / "b")
    their_sig = tmp_path / "theirs.sig"
    r = subprocess.run([cli, "sign", "key", str(theirs), "--signature", str(their_sig), "--private_key",
                        str(keys["priv"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(their_sig.read_text())["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert verify_before_load(theirs, _policy(keys), signatures=[their_sig]).status == "verified"


def test_forged_statement_is_rejected(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Editing the signed statement (e.g. to bless a tampered file) breaks the DSSE signature."""
    import base64

    model = _signed_model(tmp_path, keys)
    bundle = json.loads((model / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    (model / "config.json").write_text('{"model_type": "evil"}')
    for res in statement["predicate"]["resources"]:
        if res["name"] == "config.json":
            res["digest"] = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (model / "model.sig").write_text(json.dumps(bundle))
    with pytest.raises(ModelVerificationError, match="invalid signature"):
        verify_before_load(model, _policy(keys))


def test_trust_policy_file(tmp_path: Path, keys: dict[str, Path]) -> None:
    from inferstack.modelhub.errors import ModelHubError
    from inferstack.modelhub.policy import load_trust_policy

    shutil.copy(keys["pub"], tmp_path / "release.pub.pem")
    f = tmp_path / "trust.yaml"
    f.write_text("trust:\n  trusted_keys: [release.pub.pem]\n  allowed_registries: ['127.0.0.1:5000']\n")
    policy = load_trust_policy(f)
    assert policy.trusted_keys == [tmp_path / "release.pub.pem"]
    model = _signed_model(tmp_path, keys)
    assert verify_before_load(model, policy).status == "verified"
    f.write_text("pinned_digests: {'h.io/m:v1': 'sha256:nothex'}\n")
    with pytest.raises(ModelHubError, match=r"trust\.pinned_digests"):
        load_trust_policy(f)
    f.write_text("require_signatures: true\n")
    with pytest.raises(ModelHubError, match="require_signatures"):
        load_trust_policy(f)
