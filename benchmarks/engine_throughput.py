"""Issue 14's throughput goal, 64 concurrent × 128 in / 128 out, against HF ``generate`` batch 16, alternated.

    PYTHONPATH=src python benchmarks/engine_throughput.py [--threads 2] [--rounds 3]
        [--ours float32,bfloat16,int4,gguf] [--hf float32,bfloat16] [--quant-crossover-rows N]
        [--quant-large-kernel auto|bfloat16|float32|int8|int8blk] [--kv-cache-dtype auto,int8]

Every engine and HF model is loaded once, then each round runs every configuration in turn (the order
rotates by one each round), so a machine whose load changes hurts every row alike. Each run is timed
twice: wall clock, and the process's CPU time (``time.process_time``: all threads, spin-waits
included). On a shared machine wall-clock rates mostly measure the load; CPU-time rates
(tokens per CPU-second) move far less, and their ratios are the comparison to quote there. With
``--threads 1`` CPU time is clean; at 2 threads an OpenMP spin-wait counts too.

``ours`` names: ``float32`` is what ``engine serve`` gives by default on CPU (``--dtype auto``, no
``--quantization``), ``bfloat16`` is ``--dtype bfloat16``, ``int8``/``int4``/``gguf`` are
``--quantization`` with the bf16 copy for large steps. Our engines run with ``max_num_seqs=256`` so the
64 requests form one batch (the CPU default caps a batch at 8 sequences per thread, docs/engine.md);
``--max-num-seqs 0`` keeps that default instead.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from engine_cpu import hf_generate_tokens, load_hf, random_prompts

from inferstack.engine.llm import LLM
from inferstack.engine.sampling_params import SamplingParams

OURS = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "gguf": {"quantization": "gguf"},
}


@dataclass
class Row:
    name: str
    run: Callable[[int], int]            # one measured run (the round's prompts); returns the tokens produced
    wall: list[float] = field(default_factory=list)   # tok/s per round
    cpu: list[float] = field(default_factory=list)    # tok per CPU-second per round

    def measure(self) -> None:
        w, c = time.perf_counter(), time.process_time()
        tokens = self.run(len(self.wall))
        self.wall.append(tokens / (time.perf_counter() - w))
        self.cpu.append(tokens / (time.process_time() - c))


def our_row(name: str, kv: str, args: argparse.Namespace) -> Row:
    seqs = {} if args.max_num_seqs == 0 else {"max_num_seqs": args.max_num_seqs}
    llm = LLM(args.model, num_threads=args.threads, max_num_batched_tokens=args.max_num_batched_tokens,
              quant_crossover_rows=args.quant_crossover_rows, quant_large_kernel=args.quant_large_kernel,
              kv_cache_dtype=kv, **seqs, **OURS[name])
    quant = llm.engine.core.executor.lm.quant
    if kv != "auto":
        name = f"{name} kv {kv}"
    print(f"loaded inferstack {name}" + ("" if quant is None else f" ({'; '.join(quant.log_lines())})"), flush=True)
    rounds = round_prompts(llm.tokenizer.vocab_size, args)
    params = SamplingParams(temperature=0, max_tokens=args.out_len, ignore_eos=True)
    llm.generate([p[:8] for p in rounds[0][:4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return Row(f"inferstack {name}",
               lambda r: sum(len(o.outputs[0].token_ids) for o in llm.generate(rounds[r], params)))


def hf_row(name: str, args: argparse.Namespace) -> Row:
    model = load_hf(args.model, getattr(torch, name), torch.device("cpu"))
    rounds = [torch.tensor(p) for p in round_prompts(model.config.vocab_size, args)]
    hf_generate_tokens(model, rounds[0][:2], 2, 4)
    print(f"loaded HF {name}", flush=True)
    return Row(f"HF generate {name} batch {args.hf_batch}",
               lambda r: hf_generate_tokens(model, rounds[r], args.hf_batch, args.out_len))


def round_prompts(vocab: int, args: argparse.Namespace) -> list[list[list[int]]]:
    """Each round's own prompts (seed 1 + round: round 1's are the single-round runs' of earlier stops): the same
    prompts again would be prefix-cache hits in our engine's later rounds (no prefill), never in HF's."""
    return [random_prompts(vocab, args.requests, args.prompt_len, seed=1 + r) for r in range(args.rounds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ours", default="float32,bfloat16,int4,gguf", help=f"comma-separated, of {','.join(OURS)}")
    ap.add_argument("--hf", default="float32,bfloat16", help="HF generate dtypes, comma-separated ('' for none)")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="0: the engine's CPU default")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--quant-crossover-rows", type=int, default=None,
                    help="pin the bf16-copy crossover (default: measured at start-up, which swings under load)")
    ap.add_argument("--quant-large-kernel", default="auto",
                    help="the quantized formats' large-step copy (docs/engine.md, 'Kernel choice per step')")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="KV cache precision(s), comma-separated: each of --ours runs with each (e.g. auto,int8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [our_row(n, kv, args) for n in args.ours.split(",") if n for kv in args.kv_cache_dtype.split(",")]
    rows += [hf_row(n, args) for n in args.hf.split(",") if n]
    for r in range(args.rounds):
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            row.measure()
            print(f"round {r + 1} {row.name}: {row.wall[-1]:.1f} tok/s wall, {row.cpu[-1]:.1f} tok/CPU-s", flush=True)
            gc.collect()
    _report(rows, args)


def _report(rows: list[Row], args: argparse.Namespace) -> None:
    machine = platform.processor() or platform.machine()
    print(f"\nmachine: {machine}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.requests} x {args.prompt_len} in / {args.out_len} out, {args.rounds} rounds (medians)\n")
    peers = [r for r in rows if r.name.startswith("HF")]
    head = "".join(f" | × {p.name.split()[2]} (wall / CPU)" for p in peers)
    print(f"| engine | tok/s wall | tok per CPU-s{head} |\n|---|---:|---:" + "|---:" * len(peers) + "|")
    for r in rows:
        wall, cpu = statistics.median(r.wall), statistics.median(r.cpu)
        ratios = "".join(f" | {wall / statistics.median(p.wall):.2f}× / {cpu / statistics.median(p.cpu):.2f}×"
                         for p in peers)
        print(f"| {r.name} | {wall:.1f} | {cpu:.1f}{ratios} |")


if __name__ == "__main__":
    main()
