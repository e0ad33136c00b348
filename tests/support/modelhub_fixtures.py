"""Helpers for the model supply-chain tests: tiny models, EC keys, a CA chain, a real docker-registry."""

from __future__ import annotations

import contextlib
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


class FaultProxy:
    """A TCP proxy in front of a real server that injects network faults.

    `cut_after`: the first connection whose server->client bytes pass this count is dropped (once).
    `fail_first`: that many connections get an HTTP 503 instead of reaching the server.
    `cut_upload_after`: the first connection whose client->server bytes pass this count is dropped (once).
    `fail_after_cut`: once a connection was cut, every new connection gets a 503 (a registry that went away).
    """

    def __init__(self, target: str, *, cut_after: int | None = None, fail_first: int = 0,
                 cut_upload_after: int | None = None, fail_after_cut: bool = False) -> None:
        import socket
        import threading

        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.cut_after = cut_after
        self.cut_upload_after = cut_upload_after
        self.fail_first = fail_first
        self.fail_after_cut = fail_after_cut
        self.cuts = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.host = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                fail = self.failures < self.fail_first or (self.fail_after_cut and self.cuts > 0)
                if fail:
                    self.failures += 1
            if fail:
                client.recv(65536)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
                continue
            upstream = socket.create_connection((self.target_host, self.target_port))
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()

    def _pump(self, src, dst, direction: str) -> None:
        import socket

        sent = 0
        limit = self.cut_after if direction == "down" else self.cut_upload_after
        try:
            while data := src.recv(65536):
                sent += len(data)
                if limit is not None and sent > limit:
                    with self._lock:
                        cut = self.cuts == 0
                        if cut:
                            self.cuts += 1
                    if cut:
                        dst.sendall(data[: len(data) // 2])
                        for s in (src, dst):
                            s.shutdown(socket.SHUT_RDWR)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()


class TokenServer:
    """A Docker-style token server (ES256 JWTs with an x5c chain) for docker-registry's `auth.token`.

    Grants whatever scope is asked for, to `user:password` only; counts issued tokens.
    """

    service = "inferstack-test"
    issuer = "inferstack-test-issuer"

    def __init__(self, directory: Path, user: str, password: str) -> None:
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "token-ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.issued = 0
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                q = parse_qs(urlparse(self.path).query)
                token = server.token(user, q.get("scope", []))
                body = json.dumps({"token": token, "access_token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, subject: str, scopes: list[str]) -> str:
        import base64
        import uuid

        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": str(uuid.uuid4()), "access": access}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        self.issued += 1
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def registry_config(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.url}\n    service: {self.service}\n    issuer: {self.issuer}\n"
                f"    rootcertbundle: {self.cert_path}\n")

    def stop(self) -> None:
        self.httpd.shutdown()
