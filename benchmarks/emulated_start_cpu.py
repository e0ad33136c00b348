"""CPU seconds from launch to ready: one emulated `engine serve`, and `inferstack up` with emulated engines
(``--real``: also one real CPU engine of the bundled model).

CPU time, not wall time, because the suite's machines are shared: it is what every emulated stack in
the tests and the labs costs, whatever else runs. Counted over the whole process tree at the moment
the ready file appears (live processes and the children they already reaped).

    PYTHONPATH=src python benchmarks/emulated_start_cpu.py [--runs 3] [--src OTHER/src] [--real]

``--src`` runs the same measurement against another checkout's sources in the same run (a baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

EMULATE = "cpu:smollm2-135m"


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and every descendant, including descendants already reaped."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def measure(args: list[str], src: str, ready: Path) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to the ready file; then SIGTERM and wait."""
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "inferstack", *args, "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = t0 + 300
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{args} failed (exit {proc.returncode})")
        time.sleep(0.02)
    wall = time.monotonic() - t0
    cpu = tree_cpu(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--src", action="append", default=[], help="another source tree to measure (baseline)")
    ap.add_argument("--real", action="store_true", help="also a real CPU engine of the bundled model (model load)")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    cases = {"engine serve --emulate": ["engine", "serve", "--emulate", EMULATE, "--port", "0"],
             "up --emulate (2 engines)": ["up", "--emulate", EMULATE, "--replicas", "2", "--port", "0"]}
    if args.real:
        cases["engine serve --model (real)"] = ["engine", "serve", "--model", "smollm2-135m", "--threads", "1",
                                                "--dtype", "float32", "--port", "0"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-emustart-"))
    rows = []
    srcs = [*args.src, here]
    for name, cmd in cases.items():
        samples: dict[str, list[tuple[float, float]]] = {src: [] for src in srcs}
        for i in range(args.runs):
            for j, src in enumerate(srcs):      # interleaved: a shared machine's load hits every tree alike
                run_dir = tmp / f"{name.split()[0]}-{len(rows)}-{i}-{j}"
                run_dir.mkdir()
                extra = ["--log-dir", str(run_dir / "logs")] if cmd[0] == "up" else []
                samples[src].append(measure([*cmd, *extra], src, run_dir / "ready.json"))
        for src in srcs:
            cpu = statistics.median(s[0] for s in samples[src])
            wall = statistics.median(s[1] for s in samples[src])
            rows.append({"case": name, "src": src, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                         "runs": args.runs})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
