"""Cross-check `inferstack bench` against guidellm on the same emulated server (TTFT >= 200 ms).

guidellm lives in its own virtual environment (never a project dependency):
    python3 -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install guidellm
It gets the bundled SmolLM2 tokenizer as an offline HF tokenizer directory. Both tools send the same
synthetic load (constant rate, chat completions, streamed) to one emulated engine whose prefill of a
1024-token prompt takes ~250 ms (l4:llama-3-8b). We compare mean TTFT and mean ITL in guidellm's sense
((t_last − t1)/(n − 1), which is our TPOT) and also report our pooled chunk-gap ITL.

Run: .venv/bin/python benchmarks/bench_guidellm_crosscheck.py [--guidellm /tmp/gvenv/bin/guidellm]
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
sys.path.insert(0, str(ROOT / "src"))
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def export_tokenizer(out: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    from inferstack.engine.executor.emulated import bundled_tokenizer

    tok = bundled_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.special_tokens.get("eos_token"),
                                   bos_token=tok.special_tokens.get("bos_token"))
    fast.chat_template = tok.chat_template
    fast.save_pretrained(out)
    return out


def start_server(profile: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    ready = tmp / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "inferstack", "engine", "serve", "--emulate", profile, "--port", "0",
                             "--ready-file", str(ready)], env=ENV, stdout=(tmp / "server.log").open("wb"),
                            stderr=subprocess.STDOUT)
    while not (ready.exists() and ready.stat().st_size):
        if proc.poll() is not None:
            raise RuntimeError((tmp / "server.log").read_text()[-2000:])
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["urls"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guidellm", default="/tmp/gvenv/bin/guidellm")
    ap.add_argument("--profile", default="l4:llama-3-8b")
    ap.add_argument("--input", type=int, default=1024)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=40.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="guidellm-xcheck-"))
    tok_dir = export_tokenizer(tmp / "tokenizer")
    proc, url = start_server(args.profile, tmp)
    try:
        g_out = tmp / "guidellm.json"
        subprocess.run([args.guidellm, "run", "--backend", f"kind=openai_http,target={url}",
                        "--tokenizer", f"kind=huggingface_auto,model={tok_dir}",
                        "--data", f"kind=synthetic_text,prompt_tokens={args.input},output_tokens={args.output}",
                        "--profile", f"kind=constant,rate={args.rate}",
                        "--constraint", f"kind=max_duration,seconds={args.duration}",
                        "--output", f"kind=json,path={g_out}", "--disable-console-interactive"],
                       env=ENV, check=True, stdout=(tmp / "guidellm.log").open("wb"), stderr=subprocess.STDOUT)
        ours = tmp / "inferstack"
        subprocess.run([sys.executable, "-m", "inferstack", "bench", "run", "--target", url, "--workload",
                        f"synthetic:input={args.input},output={args.output}", "--rate", str(args.rate),
                        "--arrival", "constant", "--duration", str(args.duration), "--out", str(ours),
                        "--no-progress", "--no-plots"], env=ENV, check=True, stdout=subprocess.DEVNULL)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    g = json.loads(g_out.read_text())["benchmarks"][0]["metrics"]

    def gmean(name: str) -> float:
        return float(g[name]["successful"]["mean"])

    s = json.loads((ours / "results.json").read_text())["summary"]
    rows = {
        "TTFT mean (ms)": (s["latency_s"]["ttft"]["mean"] * 1e3, gmean("time_to_first_token_ms")),
        "ITL mean, guidellm sense = our TPOT (ms)": (s["latency_s"]["tpot"]["mean"] * 1e3,
                                                     gmean("inter_token_latency_ms")),
        "E2E/n = guidellm TPOT (ms)": (s["latency_s"]["e2e_per_token"]["mean"] * 1e3,
                                       gmean("time_per_output_token_ms")),
        "requests/s": (s["throughput"]["requests_per_s"], gmean("requests_per_second")),
    }
    print(f"profile {args.profile}, input {args.input}, output {args.output}, constant {args.rate:g} req/s, "
          f"{args.duration:g} s each; our pooled chunk-gap ITL mean {s['latency_s']['itl']['mean'] * 1e3:.2f} ms")
    print("| metric | inferstack bench | guidellm | difference |\n|---|---|---|---|")
    for k, (a, b) in rows.items():
        print(f"| {k} | {a:.2f} | {b:.2f} | {(a / b - 1) * 100:+.1f}% |")
    print(f"details: {tmp}")


if __name__ == "__main__":
    main()
