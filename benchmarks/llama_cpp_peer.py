"""llama.cpp as a peer on the same GGUF file, through its own benchmark tools.

`scripts/build_llama_cpp.sh` builds them (llama-bench, llama-batched-bench, llama-perplexity) from the
llama.cpp that llama-cpp-python vendors, AMX off; this module finds them (``--llama-cpp DIR``, else
``$LLAMA_CPP_BIN``, else ``.cache/llama.cpp/bin``, else ``PATH``) and reads their output:

* batch-1 decode: ``llama-bench -p 0 -n STEPS -d 32`` — STEPS tokens generated one at a time after a
  32-token context, the same shape as our ``decode_rate`` (tokens per second of the generation alone);
* N × P in / G out: ``llama-batched-bench -npp P -ntg G -npl N`` — N sequences with their own prompts
  decoded together; we report N·G / total time (prefill included), like our ``bench_throughput``;
* perplexity: ``llama-perplexity -c WINDOW`` over a text file.

Every tool runs with the same thread count as our engine. Going through llama.cpp's C++ tools instead
of llama-cpp-python skips Python's per-token overhead, which only makes the peer faster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

TOOLS = ("llama-bench", "llama-batched-bench", "llama-perplexity", "llama-quantize")


def find_tools(explicit: str | None = None) -> Path | None:
    """The directory holding llama.cpp's tools, or None when they are not built."""
    candidates = [explicit, os.environ.get("LLAMA_CPP_BIN"),
                  str(Path(__file__).resolve().parent.parent / ".cache" / "llama.cpp" / "bin")]
    on_path = shutil.which("llama-bench")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if c and all((Path(c) / t).is_file() for t in TOOLS[:2]):
            return Path(c)
    if explicit:
        raise SystemExit(f"--llama-cpp {explicit}: no llama-bench/llama-batched-bench there "
                         "(build them with scripts/build_llama_cpp.sh)")
    return None


def _run(cmd: list[str], timeout_s: float) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


def decode_rate(tools: Path, gguf: Path, threads: int, steps: int, repeats: int = 3) -> float:
    """Batch-1 generation tokens per second (mean of ``repeats``)."""
    out = _run([str(tools / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(steps),
                "-d", "32", "-r", str(repeats), "-o", "json"], timeout_s=600)
    return float(json.loads(out)[0]["avg_ts"])


def batched_throughput(tools: Path, gguf: Path, threads: int, sequences: int, prompt: int, generate: int) -> float:
    """Output tokens per second for ``sequences`` × (``prompt`` in / ``generate`` out), prefill included."""
    ctx = sequences * (prompt + generate) + 64
    out = _run([str(tools / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-c", str(ctx),
                "-b", "2048", "-npp", str(prompt), "-ntg", str(generate), "-npl", str(sequences),
                "--output-format", "jsonl"], timeout_s=1200)
    row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return sequences * generate / float(row["t"])


def perplexity(tools: Path, gguf: Path, text: Path, threads: int, window: int) -> float:
    """llama.cpp's perplexity estimate over ``text`` in windows of ``window`` tokens (its final figure)."""
    out = subprocess.run([str(tools / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-t", str(threads),
                          "-c", str(window), "-b", str(window)], capture_output=True, text=True, timeout=1200,
                         check=False)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"llama-perplexity exited {out.returncode}: {(out.stdout + out.stderr).strip()[-400:]}")
    return float(found.group(1))


def requantize(tools: Path, gguf: Path, out_dir: Path, kind: str) -> Path:
    """``gguf`` rewritten as ``kind`` (F32, Q8_0, ...) by llama-quantize; the F32 copy holds the file's
    weights exactly (the reference every format is compared against)."""
    out = out_dir / f"{gguf.stem}.{kind}.gguf"
    if not out.exists():
        _run([str(tools / "llama-quantize"), "--allow-requantize", str(gguf), str(out), kind], timeout_s=600)
    return out


def main() -> None:
    """Perplexity of llama.cpp's formats of the bundled model against its own F32 copy."""
    import argparse
    import tempfile

    from inferstack.engine.weights.loader import resolve_model_path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp's tools (see find_tools)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--chars", type=int, default=9000, help="leading characters of the text (~2,000 tokens)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="F32,Q8_0,Q4_1", help="Q4_1 is the bundled file itself")
    args = ap.parse_args()
    tools = find_tools(args.llama_cpp)
    if tools is None or not (tools / "llama-quantize").is_file():
        raise SystemExit("llama.cpp's tools are not built: scripts/build_llama_cpp.sh")
    gguf = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(Path(args.text).read_text()[:args.chars])
        ppl = {}
        for kind in args.formats.split(","):
            path = gguf if kind == "Q4_1" else requantize(tools, gguf, Path(tmp), kind)
            ppl[kind] = perplexity(tools, path, text, args.threads, args.window)
    ref = ppl.get("F32")
    print(f"| llama.cpp format | perplexity ({Path(args.text).name}, first {args.chars} chars, -c {args.window}) |"
          " vs F32 |\n|---|---:|---:|")
    for kind, value in ppl.items():
        delta = f"{(value / ref - 1) * 100:+.2f} %" if ref else "–"
        print(f"| {kind} | {value:.3f} | {delta} |")


if __name__ == "__main__":
    main()
