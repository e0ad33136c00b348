"""Sign/verify throughput (MB/s) on a file set, ours vs the `model_signing` CLI and API, sha256 and blake3.

    python benchmarks/supply_signing.py --size-mib 1024 --files 4 [--out results.json]

The file set is written once and read once before timing (page cache warm), so this measures hashing and
signing, not the disk. The CLI rows include its Python start-up and imports (what a user waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from inferstack.modelhub.gate import verify_before_load  # noqa: E402
from inferstack.modelhub.policy import TrustPolicy  # noqa: E402
from inferstack.modelhub.signing import SignerSpec, hash_files, model_files, sign_digests, sign_path  # noqa: E402
from support.modelhub_fixtures import write_ec_keypair  # noqa: E402


def make_file_set(root: Path, total_mib: int, files: int) -> None:
    root.mkdir(parents=True)
    block = os.urandom(16 * 1024 * 1024)
    per_file = total_mib * 1024 * 1024 // files
    for i in range(files):
        with (root / f"model-{i:05d}-of-{files:05d}.safetensors").open("wb") as f:
            left = per_file
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    (root / "config.json").write_text('{"model_type": "llama"}')
    for p in root.iterdir():  # warm the page cache
        with p.open("rb") as f:
            while f.read(1 << 24):
                pass


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="supply-bench-"))
    model = tmp / "model"
    make_file_set(model, args.size_mib, args.files)
    priv, pub = write_ec_keypair(tmp / "keys")
    spec = SignerSpec(priv)
    policy = TrustPolicy(trusted_keys=[pub])
    mb = args.size_mib * 1024 * 1024 / 1e6
    rows: list[dict] = []

    def row(tool: str, op: str, algo: str, seconds: float) -> None:
        rows.append({"tool": tool, "op": op, "hash": algo, "seconds": round(seconds, 3), "MB/s": round(mb / seconds)})
        print(f"{tool:42s} {op:7s} {algo:7s} {seconds:7.2f}s {mb / seconds:8.0f} MB/s", flush=True)

    import blake3  # noqa: F401  (import cost outside the timings, like model_signing's below)
    import model_signing  # noqa: F401
    from model_signing import hashing, signing, verifying

    sig = model / "model.sig"
    for algo in ("sha256", "blake3"):
        row("inferstack (API)", "sign", algo, timed(lambda a=algo: sig.write_bytes(sign_path(model, spec, a))))
        row("inferstack (API, load gate)", "verify", algo, timed(lambda: verify_before_load(model, policy)))
        sig.unlink()
        cfg = hashing.Config().use_file_serialization(hashing_algorithm=algo)
        out = tmp / f"ms-{algo}.sig"
        row("model_signing 1.1.1 (API)", "sign", algo,
            timed(lambda c=cfg, o=out: signing.Config().use_elliptic_key_signer(private_key=priv)
                  .set_hashing_config(c).sign(model, o)))
        row("model_signing 1.1.1 (API)", "verify", algo,
            timed(lambda o=out: verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(model, o)))
    cli = str(Path(sys.executable).parent / "model_signing")
    out = tmp / "cli.sig"
    row("model_signing 1.1.1 CLI (incl. start-up)", "sign", "sha256",
        timed(lambda: subprocess.run([cli, "sign", "key", str(model), "--signature", str(out), "--private_key",
                                      str(priv)], check=True, capture_output=True)))
    row("model_signing 1.1.1 CLI (incl. start-up)", "verify", "sha256",
        timed(lambda: subprocess.run([cli, "verify", "key", str(model), "--signature", str(out), "--public_key",
                                      str(pub)], check=True, capture_output=True)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    ours = [sys.executable, "-m", "inferstack", "model"]
    for algo in ("sha256", "blake3"):
        row("inferstack CLI (incl. start-up)", "sign", algo,
            timed(lambda a=algo: subprocess.run([*ours, "sign", str(model), "--key", str(priv), "--hash", a,
                                                 "--signature", str(tmp / "ours.sig")], check=True,
                                                capture_output=True, env=env)))
        row("inferstack CLI (incl. start-up)", "verify", algo,
            timed(lambda: subprocess.run([*ours, "verify", str(model), "--public-key", str(pub), "--signature",
                                          str(tmp / "ours.sig")], check=True, capture_output=True, env=env)))
    root, rels = model_files(model)
    digests = hash_files(root, rels, "sha256")
    row("inferstack sign from layer digests (pack)", "sign", "sha256",
        timed(lambda: sign_digests("model", digests, spec)))
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "size_mib": args.size_mib, "files": args.files, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    import shutil

    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
