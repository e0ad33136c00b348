"""Push/pull throughput against one real docker-registry: inferstack vs the oras Python client.

    python benchmarks/supply_transfer.py --size-mib 256 [--repeats 3] [--out results.json]

Both clients push the same files (one large weight file + config.json) to different repositories of the
same registry (plain HTTP on loopback), then pull them into empty folders. Rounds interleave the two
clients, each round with fresh repositories and folders; best and median per operation are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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
    ap.add_argument("--repeats", type=int, default=3)
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
    times: dict[tuple[str, str], list[float]] = {}

    def timed(tool: str, op: str, fn) -> None:
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
        times.setdefault((tool, op), []).append(seconds)
        print(f"{tool:32s} {op:5s} {seconds:7.2f}s {mb / seconds:7.0f} MB/s", flush=True)

    try:
        store = Store(tmp / "store")
        digest = pack(model, parse_reference(f"{reg.host}/bench/inferstack:v0"), store).manifest_digest
        client = oras.client.OrasClient(hostname=reg.host, insecure=True)
        for i in range(args.repeats):  # interleaved rounds, fresh repositories and folders each time
            ref = parse_reference(f"{reg.host}/bench/inferstack{i}:v1")
            store.tag(str(ref), digest)
            with RegistryClient(reg.host, plain_http=True) as c:
                timed("inferstack (16 MiB chunks)", "push", lambda r=ref, c=c: push_model(store, r, c))
                timed("inferstack", "pull", lambda r=ref, c=c, i=i: pull_model(Store(tmp / f"pulled{i}"), r, c))
            shutil.rmtree(tmp / f"pulled{i}")
            target = f"{reg.host}/bench/oras{i}:v1"
            cwd = os.getcwd()
            os.chdir(model)  # oras-py names layers after the relative paths it is given
            try:
                timed("oras-py 0.2 (monolithic PUT)", "push", lambda t=target: client.push(
                    target=t, files=["model.bin:application/vnd.cncf.model.weight.v1.raw",
                                     "config.json:application/vnd.cncf.model.weight.config.v1.raw"]))
            finally:
                os.chdir(cwd)
            timed("oras-py 0.2", "pull", lambda t=target, i=i: client.pull(target=t, outdir=str(tmp / f"oras{i}")))
            shutil.rmtree(tmp / f"oras{i}")
    finally:
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"tool": tool, "op": op, "best_s": round(min(ts), 3), "median_s": round(statistics.median(ts), 3),
             "best_MB/s": round(mb / min(ts)), "median_MB/s": round(mb / statistics.median(ts))}
            for (tool, op), ts in times.items()]
    for r in rows:
        print(f"{r['tool']:32s} {r['op']:5s} best {r['best_MB/s']:5d} MB/s  median {r['median_MB/s']:5d} MB/s")
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "size_mib": args.size_mib, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
