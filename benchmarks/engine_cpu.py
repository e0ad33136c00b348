"""Engine benchmarks on the bundled model, with HF transformers measured in the same run.

    python benchmarks/engine_cpu.py [--dtype float32|bfloat16] [--quantization none|int8|int4|gguf]
                                    [--kv-cache-dtype auto|bfloat16|int8|fp8_e4m3] [--threads 2]
                                    [--device cpu|cuda] [--model M] [--hf-dtypes float32,bfloat16]

Issue 14's throughput comparison in one go: ``--quantization int4`` (or gguf) against HF fp32 and bf16.

Prints a Markdown table (paste into docs/benchmarks.md) covering:
  1. throughput: 64 concurrent requests, 128 prompt / 128 output tokens (ignore_eos), vs HF
     `generate` with a static batch of 16 in each of ``--hf-dtypes`` (default fp32 and bf16);
  2. batch-1 decode tok/s and its share of the memory-bandwidth roofline (bandwidth from a large
     tensor copy; bytes = weights the kernels read per step + the KV read);
  3. TTFT of a 1,000-token prompt, cold vs fully prefix-cached.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from inferstack.engine.llm import LLM
from inferstack.engine.sampling_params import SamplingParams


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best  # a copy reads and writes every byte


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def bench_throughput(llm: LLM, n: int, prompt_len: int, out_len: int) -> float:
    prompts = random_prompts(llm.tokenizer.vocab_size, n, prompt_len, seed=1)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    results = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    return sum(len(r.outputs[0].token_ids) for r in results) / dt


def load_hf(model_ref: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """transformers' own model for ``model_ref`` (a bundled GGUF loads through transformers' GGUF reader)."""
    from transformers import AutoModelForCausalLM

    from inferstack.engine.weights.loader import resolve_model_path

    path = resolve_model_path(model_ref)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def hf_generate_tokens(model: torch.nn.Module, prompts: torch.Tensor, batch: int, out_len: int) -> int:
    """Greedy ``generate`` over ``prompts`` in static batches of ``batch``; returns the tokens produced."""
    produced = 0
    with torch.inference_mode():
        for i in range(0, prompts.shape[0], batch):
            out = model.generate(prompts[i:i + batch], max_new_tokens=out_len, min_new_tokens=out_len,
                                 do_sample=False, pad_token_id=0)
            produced += (out.shape[1] - prompts.shape[1]) * out.shape[0]
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    return produced


def bench_hf_throughput(model_ref: str, dtype: torch.dtype, device: torch.device, n: int, batch: int,
                        prompt_len: int, out_len: int, vocab: int) -> float:
    model = load_hf(model_ref, dtype, device)
    prompts = torch.tensor(random_prompts(vocab, n, prompt_len, seed=1), device=device)
    hf_generate_tokens(model, prompts[:2], 2, 4)
    t = time.perf_counter()
    produced = hf_generate_tokens(model, prompts, batch, out_len)
    return produced / (time.perf_counter() - t)


def bench_decode_b1(llm: LLM, steps: int = 128) -> tuple[float, float]:
    """Returns (decode tok/s, mean context length) for one sequence, prefill excluded."""
    prompt = random_prompts(llm.tokenizer.vocab_size, 1, 32, seed=2)
    core = llm.engine.core
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    from inferstack.engine.llm import expand_choices

    (request,) = expand_choices("b1", prompt[0], params, time.monotonic(), frozenset())
    core.add_request(request)
    core.step()  # prefill + first token
    t = time.perf_counter()
    n = 0
    while core.has_unfinished():
        n += len(core.step())
    return n / (time.perf_counter() - t), 32 + steps / 2


def bench_ttft(llm: LLM, prompt_len: int = 1000, repeats: int = 3) -> tuple[float, float]:
    params = SamplingParams(temperature=0, max_tokens=1)
    cold, warm = [], []
    for r in range(repeats):
        prompt = random_prompts(llm.tokenizer.vocab_size, 1, prompt_len, seed=100 + r)
        t = time.perf_counter()
        llm.generate(prompt, params)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = llm.generate(prompt, params)[0]
        warm.append(time.perf_counter() - t)
        assert res.num_cached_tokens >= prompt_len - 16
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="activations (and weights unless --quantization)")
    ap.add_argument("--quantization", default="none", choices=("none", "int8", "int4", "gguf"))
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-dtypes", default="float32,bfloat16", help="HF generate peers, comma-separated")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, num_threads=args.threads,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              max_num_batched_tokens=2048, max_num_seqs=256)
    vocab = llm.tokenizer.vocab_size

    rows: list[tuple[str, str]] = []
    ours = bench_throughput(llm, 64, 128, 128)
    rows.append(("throughput, 64 × (128 in / 128 out), inferstack", f"{ours:.1f} tok/s"))
    for name in [] if args.skip_hf else args.hf_dtypes.split(","):
        hf = bench_hf_throughput(args.model, getattr(torch, name), device, 64, 16, 128, 128, vocab)
        rows.append((f"throughput, HF generate {name} static batch 16", f"{hf:.1f} tok/s"))
        rows.append((f"ratio inferstack / HF {name}", f"{ours / hf:.2f}×"))

    tok_s, ctx = bench_decode_b1(llm)
    bw = measure_bandwidth(device)
    executor = llm.engine.core.executor
    arch = executor.lm.arch
    kv_bytes = 2 * arch.num_layers * arch.num_kv_heads * executor.kv_format.bytes_per_row() * ctx
    step_bytes = arch.weight_bytes_per_step + kv_bytes
    roofline = bw / step_bytes
    weights = args.dtype if args.quantization == "none" else args.quantization
    rows.append(("batch-1 decode", f"{tok_s:.1f} tok/s"))
    rows.append(("memory bandwidth (1 GiB copy)", f"{bw / 1e9:.1f} GB/s"))
    rows.append(("bytes read per decode step (weights + KV)",
                 f"{step_bytes / 1e6:.1f} MB ({weights} weights, {executor.kv_format.name} KV)"))
    rows.append(("roofline decode", f"{roofline:.1f} tok/s"))
    rows.append(("share of roofline", f"{100 * tok_s / roofline:.0f}%"))

    cold, warm = bench_ttft(llm)
    rows.append(("TTFT 1,000-token prompt, cold", f"{cold * 1000:.0f} ms"))
    rows.append(("TTFT 1,000-token prompt, prefix-cached", f"{warm * 1000:.1f} ms"))
    rows.append(("cold / cached", f"{cold / warm:.1f}×"))

    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, weights {weights}, "
          f"KV {executor.kv_format.name}\n")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
