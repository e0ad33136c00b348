"""Helpers for the model supply-chain tests: tiny models, EC keys, a CA chain, a real docker-registry."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.numpy import save_file

from support.procs import free_port

DOCKER_REGISTRY = "/usr/bin/docker-registry"


def tiny_hf_model(root: Path, seed: int = 0, hidden: int = 16) -> Path:
    """A small Llama-shaped Hugging Face folder: config, safetensors weights, tokenizer, README."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((64, hidden), dtype=np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((hidden, hidden), dtype=np.float32),
        "lm_head.weight": rng.standard_normal((64, hidden), dtype=np.float32),
    }
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": 1, "vocab_size": 64, "torch_dtype": "float32",
    }))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (root / "README.md").write_text("# tiny\nA test model.\n")
    return root


def write_ec_keypair(directory: Path, name: str = "key") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    priv = directory / f"{name}.pem"
    pub = directory / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@dataclass
class CertChain:
    ca_cert: Path
    leaf_key: Path
    leaf_cert: Path


def write_cert_chain(directory: Path) -> CertChain:
    """A self-made CA and a code-signing leaf (what `model_signing sign certificate` expects)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inferstack test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "model signer")]))
        .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = CertChain(directory / "ca.pem", directory / "leaf.key.pem", directory / "leaf.pem")
    chain.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.leaf_cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    chain.leaf_key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return chain


@dataclass
class Registry:
    proc: subprocess.Popen
    host: str
    root: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def start_registry(htpasswd: tuple[str, str] | None = None, extra_config: str = "") -> Registry:
    """Debian's docker-registry (distribution 2.8) on a free loopback port, filesystem storage in a tmp dir."""
    import bcrypt

    root = Path(tempfile.mkdtemp(prefix="inferstack-registry-"))
    port = free_port()
    auth = ""
    if htpasswd:
        user, password = htpasswd
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (root / "htpasswd").write_text(f"{user}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: inferstack-test\n    path: {root / 'htpasswd'}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"{auth}{extra_config}"
    )
    log = root / "registry.log"
    proc = subprocess.Popen([DOCKER_REGISTRY, "serve", str(config)], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    reg = Registry(proc, f"127.0.0.1:{port}", root, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        try:
            r = httpx.get(f"{reg.url}/v2/", timeout=1)
            if r.status_code in (200, 401):
                return reg
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    reg.stop()
    raise TimeoutError("docker-registry did not start")
