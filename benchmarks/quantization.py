"""Weight formats side by side: batch-1 decode and 64 × 128/128 throughput, with peers in the same run.

    PYTHONPATH=src python benchmarks/quantization.py [--threads 2] [--formats float32,bfloat16,int8,int4,gguf]
                                                     [--requests 64] [--skip-hf] [--kv-cache-dtype auto]

The default command is issue 14's whole comparison in one go: batch-1 decode per format against HF and
(when built) llama.cpp on the same GGUF, and 64 x 128/128 against HF fp32 and bf16 static batch 16 and
llama.cpp's batched decode.

Rows: our engine in each format (``--quantization`` with the bf16 copy for large steps and the
start-up crossover), HF ``generate`` fp32 and bf16 (static batch 16; batch 1 for decode) and, when
its tools are built (``scripts/build_llama_cpp.sh``), llama.cpp on the same GGUF
(``benchmarks/llama_cpp_peer.py``; skipped otherwise). Ratios are against our fp32 row measured in
the same run, the number that survives a contended machine.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time

import llama_cpp_peer
import torch
from engine_cpu import bench_hf_throughput, bench_throughput, random_prompts

from inferstack.engine.evaluate import decode_rate
from inferstack.engine.llm import LLM
from inferstack.engine.weights.loader import resolve_model_path

FORMATS = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "gguf": {"quantization": "gguf"},
    # gguf with the decoder layers in Python even when the C++ decode layers are built (models/fused_decode.py)
    "gguf-python-layers": {"quantization": "gguf"},
}


def ours(model: str, name: str, threads: int, requests: int, steps: int, kv: str) -> tuple[float, float, str]:
    llm = LLM(model, num_threads=threads, max_num_batched_tokens=2048, max_num_seqs=256, kv_cache_dtype=kv,
              **FORMATS[name])
    lm = llm.engine.core.executor.lm
    detail = "" if lm.quant is None else "; ".join(lm.quant.log_lines()[:2])
    if name.endswith("-python-layers"):
        lm.model.fused = None
        detail += "; decoder layers in Python"
    decode = decode_rate(llm, steps=steps)
    throughput = bench_throughput(llm, requests, 128, 128)
    del llm, lm
    gc.collect()
    return decode, throughput, detail


def hf_decode(model: str, dtype: torch.dtype, steps: int) -> float:
    """HF ``generate`` batch 1: (time for 1 + steps tokens − time for 1 token) / steps."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent if kwargs else path), dtype=dtype, **kwargs).eval()
    prompt = torch.tensor(random_prompts(hf.config.vocab_size, 1, 32, seed=2))

    def run(n: int) -> float:
        t = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    with torch.inference_mode():
        run(4)
        return steps / (run(steps + 1) - run(1))


def llama_cpp_row(model: str, tools_dir: str | None, threads: int, requests: int, steps: int
                  ) -> tuple[float | None, float | None, str]:
    """llama.cpp's own tools on the same GGUF (benchmarks/llama_cpp_peer.py), or a note saying why not."""
    tools = llama_cpp_peer.find_tools(tools_dir)
    path = resolve_model_path(model)
    if tools is None:
        return None, None, "not built: skipped (scripts/build_llama_cpp.sh)"
    if path.suffix != ".gguf":
        return None, None, f"{path.name} is not a GGUF file: skipped"
    decode = llama_cpp_peer.decode_rate(tools, path, threads, steps)
    throughput = llama_cpp_peer.batched_throughput(tools, path, threads, requests, 128, 128)
    return decode, throughput, f"llama-bench / llama-batched-bench, same GGUF, {tools}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="float32,bfloat16,int8,int4,gguf",
                    help=f"comma-separated, from: {', '.join(FORMATS)}")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=128, help="batch-1 decode tokens")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto", help="our engine's KV cache (auto: bf16 with int8/int4)")
    ap.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp's tools (default: $LLAMA_CPP_BIN, "
                    ".cache/llama.cpp/bin or PATH; built by scripts/build_llama_cpp.sh)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch "
          f"{torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}\n")
    names = args.formats.split(",")
    print(f"| engine / format | batch-1 decode tok/s | × {names[0]} | {args.requests} × 128/128 tok/s | "
          f"× {names[0]} | notes |\n|---|---:|---:|---:|---:|---|", flush=True)
    base: list[float | None] = []

    def row(name: str, dec: float | None, tp: float | None, note: str) -> None:
        """Printed as soon as measured: a long run on a busy machine still leaves its rows."""
        if not base:
            base.extend((dec, tp))
        cells = [("–", "–") if v is None else (f"{v:.1f}", f"{v / ref:.2f}×" if ref else "–")
                 for v, ref in ((dec, base[0]), (tp, base[1]))]
        print(f"| {name} | {cells[0][0]} | {cells[0][1]} | {cells[1][0]} | {cells[1][1]} | {note} |", flush=True)

    for name in names:
        decode, throughput, detail = ours(args.model, name, args.threads, args.requests, args.steps,
                                          args.kv_cache_dtype)
        row(f"inferstack {name}", decode, throughput, detail)
    vocab = LLM(args.model, num_threads=args.threads, kv_cache_bytes=16 << 20).tokenizer.vocab_size
    if not args.skip_hf:
        for dt in (torch.float32, torch.bfloat16):
            dec = hf_decode(args.model, dt, args.steps)
            tp = bench_hf_throughput(args.model, dt, torch.device("cpu"), args.requests, 16, 128, 128, vocab)
            row(f"HF generate {str(dt).removeprefix('torch.')}", dec, tp, "static batch 16 for throughput")
    row("llama.cpp", *llama_cpp_row(args.model, args.llama_cpp, args.threads, args.requests, args.steps))

if __name__ == "__main__":
    main()
