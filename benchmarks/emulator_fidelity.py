"""Emulator fidelity: the emulated `cpu:smollm2-135m` engine against the real engine, same workload.

Both servers run one torch thread / one emulated device; the same `inferstack bench` load (seeded
synthetic prompts, constant arrivals, streamed) goes to each in turn. We report TTFT, TPOT, ITL and
throughput with the emulator's error in %. The `cpu` profile comes from `inferstack engine calibrate`
(`--calibrate` runs it first, a few minutes) or else from the catalog default fitted on this machine.

Run: .venv/bin/python benchmarks/emulator_fidelity.py [--calibrate] [--rate 0.3] [--duration 90]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")


def serve(args: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, "-m", "inferstack", "engine", "serve", *args, "--port", "0",
                             "--ready-file", str(ready)], env=ENV, stdout=(tmp / f"{name}.log").open("wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not (ready.exists() and ready.stat().st_size):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / f"{name}.log").read_text()[-2000:])
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())["urls"][0]


def bench(url: str, out: Path, args: argparse.Namespace) -> dict:
    subprocess.run([sys.executable, "-m", "inferstack", "bench", "run", "--target", url, "--workload",
                    f"synthetic:input={args.input},output={args.output}", "--rate", str(args.rate), "--arrival",
                    "constant", "--duration", str(args.duration), "--warmup", str(args.warmup), "--endpoint",
                    "completions", "--out", str(out), "--no-progress", "--no-plots"], env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.3)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="emu-fidelity-"))
    if args.calibrate:
        subprocess.run([sys.executable, "-m", "inferstack", "engine", "calibrate", "--model", "smollm2-135m",
                        "--threads", "1"], env=ENV, check=True)
    results = {}
    for name, flags in (("real", ["--model", "smollm2-135m", "--threads", "1"]),
                        ("emulated", ["--emulate", "cpu:smollm2-135m"])):
        proc, url = serve(flags, tmp, name)
        try:
            results[name] = bench(url, tmp / name, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    real, emu = results["real"], results["emulated"]
    print(f"workload synthetic input {args.input} output {args.output}, constant {args.rate:g} req/s, "
          f"{args.duration:g} s (warm-up {args.warmup:g} s); load average {os.getloadavg()[0]:.1f}")
    print("| metric | real engine | emulated | error |\n|---|---|---|---|")
    for label, key in (("TTFT mean (ms)", "ttft"), ("TPOT mean (ms)", "tpot"), ("ITL mean (ms)", "itl"),
                       ("E2E mean (ms)", "e2e")):
        a, b = real["latency_s"][key]["mean"] * 1e3, emu["latency_s"][key]["mean"] * 1e3
        print(f"| {label} | {a:.1f} | {b:.1f} | {(b / a - 1) * 100:+.1f}% |")
    a, b = real["throughput"]["output_tokens_per_s"], emu["throughput"]["output_tokens_per_s"]
    print(f"| output tokens/s | {a:.2f} | {b:.2f} | {(b / a - 1) * 100:+.1f}% |")
    print(f"details: {tmp}")


if __name__ == "__main__":
    main()
