"""`signing`: sign a model with OpenSSF model signing, verify it, tamper one byte, and watch the check refuse.

The model is a small Hugging Face-style folder written into the run directory (a config and one
safetensors file of random weights), so the lab needs no download. Each hash (sha256, blake3) signs
it into its own bundle with a freshly generated EC key; `inferstack model verify` checks it with
the public key (what the engine does before loading), then with another key (refused), and after
one byte of the weights is flipped (refused, naming the file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.numpy import save_file

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import compare
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabError, LabRun

HASHES = ("sha256", "blake3")
MIB = 1 << 20


def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A P-256 key pair as PEM files (private key unencrypted: a lab key, never a real one)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def write_model(root: Path, mib: int, seed: int = 0) -> Path:
    """A Llama-shaped folder whose weights file holds ``mib`` MiB of random float32 values."""
    root.mkdir(parents=True, exist_ok=True)
    rows = mib * MIB // (4 * 1024)
    weights = np.random.default_rng(seed).random((rows, 1024), dtype=np.float32)
    save_file({"model.embed_tokens.weight": weights}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "hidden_size": 1024, "vocab_size": rows}))
    return root


def flip_byte(path: Path) -> int:
    """Flip one bit-pattern byte in the middle of ``path``; returns its offset."""
    offset = path.stat().st_size // 2
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return offset


def _verify(lab: LabRun, model: Path, pub: Path, sig: Path) -> tuple[int, dict | None, str]:
    r = lab.cli("model", "verify", str(model), "--public-key", str(pub), "--signature", str(sig), "--json",
                expect=None)
    return r.rc, (json.loads(r.stdout) if r.rc == 0 else None), r.stderr.strip()


def _size_rows(lab: LabRun, mib: int) -> tuple[list[list], list[str]]:
    model = write_model(lab.out / f"model-{mib}mib", mib)
    priv, pub = write_keypair(lab.out / "keys", "signer")
    _, other_pub = write_keypair(lab.out / "keys", "other")
    rows, refusals = [], []
    sigs = {h: lab.out / f"model-{mib}mib.{h}.sig" for h in HASHES}
    for h in HASHES:
        signed = lab.cli("model", "sign", str(model), "--key", str(priv), "--hash", h, "--signature", str(sigs[h]))
        rc, ok, err = _verify(lab, model, pub, sigs[h])
        if rc != 0 or ok is None or ok["status"] != "verified":
            raise LabError(f"verify of the untouched model failed ({h}): {err}")
        rc_key, _, err_key = _verify(lab, model, other_pub, sigs[h])
        rows.append([f"{mib} MiB, {h}", ok["bytes"] / MIB, ok["files"], signed.seconds, ok["seconds"] * 1000,
                     sigs[h].stat().st_size, "refused" if rc_key else "ACCEPTED"])
        refusals.append(err_key)
    offset = flip_byte(model / "model.safetensors")
    for row, h in zip(rows, HASHES, strict=True):
        rc, _, err = _verify(lab, model, pub, sigs[h])
        row.append("refused" if rc else "ACCEPTED")
        refusals.append(err)
    refusals.append(f"(one byte flipped at offset {offset:,} of model.safetensors)")
    return rows, refusals


def run(lab: LabRun) -> LabResult:
    sizes = (4,) if lab.quick else (16, 256)
    rows, refusals = [], []
    for mib in sizes:
        r, why = _size_rows(lab, mib)
        rows += r
        refusals += why
    largest = rows[-len(HASHES):]
    tamper_ok = all(r[7] == "refused" for r in rows)
    key_ok = all(r[6] == "refused" for r in rows)
    findings = [
        compare(f"Verifying {largest[0][1]:.0f} MiB (hashing every file)", "sha256", largest[0][4],
                "blake3", largest[1][4]) + ": verification re-hashes every byte, so its cost grows with the "
        f"model; the signature bundle is {max(r[5] for r in rows):,} bytes whatever the size.",
        f"Signing took {min(r[3] for r in rows):.2f}-{max(r[3] for r in rows):.2f} s of wall time per command "
        "(CLI start-up included; the hashing is the part that grows with size).",
        ("Flipping one byte of the weights made every verification fail" if tamper_ok else
         "WARNING: a tampered model passed verification") + "; a key other than the signer's was "
        + ("refused every time." if key_ok else "ACCEPTED: check the trust setup."),
        "What verify said: " + " | ".join(dict.fromkeys(r for r in refusals if r)),
    ]
    plot = bar_plot(lab.out / "verify.png", "Verification time (hashing the model)", "ms",
                    {h: [r[4] for r in rows if r[0].endswith(h)] for h in HASHES}, [f"{m} MiB" for m in sizes])
    table = Table("inferstack model sign / verify on a folder model (EC P-256 key made for this run)",
                  ["model, hash", "MiB hashed", "files", "sign (s, CLI wall)", "verify hashing (ms)",
                   "signature (bytes)", "other key", "after 1-byte tamper"], rows)
    return LabResult(findings, [table], [plot], {"rows": rows, "refusals": refusals})


LAB = Lab(
    name="signing", week=4, title="Model signature verification",
    question="What does signing a model protect against, and what does checking it cost at load time?",
    teaches="sign a model folder (OpenSSF model signing), verify, wrong key and one tampered byte refused",
    needs=("inferstack model sign/verify", "a model folder written into the run directory"),
    minutes=0.5, run=run)
