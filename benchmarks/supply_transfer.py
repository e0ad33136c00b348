"""Push/pull throughput against one real docker-registry: inferstack vs the oras Python client.

    python benchmarks/supply_transfer.py --size-mib 256 [--out results.json]

Both clients push the same files (one large weight file + config.json) to different repositories of the
same registry (plain HTTP on loopback), then pull them into empty folders. Each operation runs once,
starting from an empty registry repository and an empty local store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from inferstack.modelhub.pack import pack  # noqa: E402
from inferstack.modelhub.reference import parse_reference  # noqa: E402
from inferstack.modelhub.registry import RegistryClient  # noqa: E402
from inferstack.modelhub.store import Store  # noqa: E402
from inferstack.modelhub.transfer import pull_model, push_model  # noqa: E402
from support.modelhub_fixtures import start_registry  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import oras.client

    tmp = Path(tempfile.mkdtemp(prefix="supply-transfer-"))
    model = tmp / "model"
    model.mkdir()
    block = os.urandom(16 * 1024 * 1024)
    with (model / "model.bin").open("wb") as f:
        for _ in range(args.size_mib // 16):
            f.write(block)
    (model / "config.json").write_text('{"model_type": "llama"}')
    mb = args.size_mib * 1024 * 1024 / 1e6
    reg = start_registry()
    rows = []

    def row(tool: str, op: str, seconds: float) -> None:
        rows.append({"tool": tool, "op": op, "seconds": round(seconds, 3), "MB/s": round(mb / seconds)})
        print(f"{tool:28s} {op:5s} {seconds:7.2f}s {mb / seconds:7.0f} MB/s", flush=True)

    try:
        store = Store(tmp / "store")
        ref = parse_reference(f"{reg.host}/bench/inferstack:v1")
        pack(model, ref, store)  # not timed: oras has no separate pack step, it reads the files directly
        with RegistryClient(reg.host, plain_http=True) as c:
            t = time.perf_counter()
            push_model(store, ref, c)
            row("inferstack (16 MiB chunks)", "push", time.perf_counter() - t)
        with RegistryClient(reg.host, plain_http=True) as c:
            t = time.perf_counter()
            pull_model(Store(tmp / "pulled"), ref, c)
            row("inferstack", "pull", time.perf_counter() - t)
        ref64 = parse_reference(f"{reg.host}/bench/inferstack64:v1")
        store.tag(str(ref64), store.resolve(str(ref)))
        with RegistryClient(reg.host, plain_http=True, chunk_size=64 * 1024 * 1024) as c:
            t = time.perf_counter()
            push_model(store, ref64, c)
            row("inferstack (64 MiB chunks)", "push", time.perf_counter() - t)
        client = oras.client.OrasClient(hostname=reg.host, insecure=True)
        target = f"{reg.host}/bench/oras:v1"
        cwd = os.getcwd()
        os.chdir(model)  # oras-py names layers after the relative paths it is given
        try:
            t = time.perf_counter()
            client.push(target=target, files=["model.bin:application/vnd.cncf.model.weight.v1.raw",
                                              "config.json:application/vnd.cncf.model.weight.config.v1.raw"])
            row("oras-py 0.2 (monolithic)", "push", time.perf_counter() - t)
        finally:
            os.chdir(cwd)
        t = time.perf_counter()
        client.pull(target=target, outdir=str(tmp / "oras-pulled"))
        row("oras-py 0.2", "pull", time.perf_counter() - t)
    finally:
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "size_mib": args.size_mib, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
