"""`inferstack up` timings: time to ready, engine crash → serving again, SIGTERM → all gone.

Peer in the same run: one bare `inferstack engine serve` of the same model, start to ready, so the
supervisor's own share (gateway start, checks) is the difference.

    PYTHONPATH=src python benchmarks/stack_up.py [--replicas 2] [--model smollm2-135m]
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

import httpx


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{proc.args} failed (exit {proc.returncode})")
        time.sleep(0.05)
    return json.loads(path.read_text().splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-up-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = [sys.executable, "-m", "inferstack"]

    threads = str(max(1, len(os.sched_getaffinity(0)) // args.replicas))
    t0 = time.monotonic()
    engine = subprocess.Popen([*py, "engine", "serve", "--model", args.model, "--threads", threads, "--port", "0",
                               "--ready-file", str(tmp / "engine.json")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    wait_file(tmp / "engine.json", engine)
    engine_ready = time.monotonic() - t0
    engine.send_signal(signal.SIGTERM)
    engine.wait(60)

    t0 = time.monotonic()
    up = subprocess.Popen([*py, "up", "--replicas", str(args.replicas), "--model", args.model, "--port", "0",
                           "--log-dir", str(tmp / "run"), "--ready-file", str(tmp / "up.json")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ready = wait_file(tmp / "up.json", up)
    up_ready = time.monotonic() - t0
    state_file = Path(ready["state_file"])
    victim = next(c for c in json.loads(state_file.read_text())["children"] if c["name"] == "engine-0")

    t0 = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    while True:
        now = next(c for c in json.loads(state_file.read_text())["children"] if c["name"] == "engine-0")
        if now["pid"] != victim["pid"] and now["state"] == "ready":
            break
        time.sleep(0.05)
    recovered = time.monotonic() - t0
    r = httpx.post(ready["urls"][0] + "/v1/chat/completions", timeout=120, json={
        "model": args.model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text

    pids = [c["pid"] for c in json.loads(state_file.read_text())["children"]]
    t0 = time.monotonic()
    up.send_signal(signal.SIGTERM)
    up.wait(120)
    while any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.02)
    stopped = time.monotonic() - t0

    print(f"bare engine start → ready ({args.model}, {threads} thread(s)): {engine_ready:6.1f} s")
    print(f"inferstack up, {args.replicas} replicas + gateway → ready:       {up_ready:6.1f} s "
          f"({up_ready / engine_ready:.2f}× the bare engine)")
    print(f"engine SIGKILL → restarted and ready (backoff 1 s):     {recovered:6.1f} s")
    print(f"SIGTERM → every child gone:                             {stopped:6.1f} s")


if __name__ == "__main__":
    main()
