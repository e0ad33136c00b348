"""Decode step time of the built-in engine at several batch sizes, split into its parts.

    python benchmarks/engine_decode_step.py [--batches 1,16,64] [--dtype float32] [--threads 1] [--steps 8]
                                            [--quantization none|int8|int4|gguf] [--quant-crossover-rows N]
                                            [--quant-large-kernel auto|bfloat16|float32|int8|int8blk]
                                            [--layers cpp,python] [--attention cpp,torch] [--kv-cache-dtype int8]

For each batch size B: B requests with 128-token prompts are prefilled, then ``--steps`` decode
steps are timed. Prints the median of three numbers per step: the whole ``EngineCore.step``
(scheduling, executor, sampling, detokenizing), the executor alone, and the model forward alone; and the
C++ decode attention's CPU time per step (its calls in all layers, mean over the steps) where it runs.

``--layers cpp,python`` measures each batch size twice, with the C++ decode layers
(engine/models/fused_decode.py; batch 1 with int4 weights, when built) and with the Python layer loop.
``--attention cpp,torch`` does the same for decode attention: the C++ kernel that reads the paged cache in
place (models/csrc/paged_attention.cpp, when built) against the torch gather path, one after the other
per batch size (same process, same minutes).

Times are process CPU time (``time.process_time``), so a shared, loaded machine inflates them far
less than wall time; with ``--threads`` above 1 they add up the threads' time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inferstack.engine.llm import LLM, expand_choices
from inferstack.engine.sampling_params import SamplingParams


def _timed(fn, sink: list[float]):
    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.process_time() - t)
    return wrapper


def measure(llm: LLM, batch: int, steps: int, prompt_len: int = 128,
            attention: list[float] | None = None) -> tuple[float, float, float]:
    """Median CPU ms of the step, the executor and the forward; ``attention`` (the C++ decode attention's
    call times, when timed) is cleared before the timed steps, so it holds only theirs."""
    core = llm.engine.core
    executor = core.executor
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, llm.tokenizer.vocab_size - 100, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i, p in enumerate(prompts):
        for r in expand_choices(f"b{batch}-{i}", p, params, time.monotonic(), frozenset()):
            core.add_request(r)
    # Prefill every request (and take the first decode step untimed, to warm the buffers).
    while any(r.num_computed_tokens < prompt_len for r in core.scheduler.running) or core.scheduler.num_waiting:
        core.step()
    core.step()
    exec_times: list[float] = []
    model_times: list[float] = []
    step_times: list[float] = []
    real_execute, real_model = executor.execute, executor.lm.model
    executor.execute = _timed(real_execute, exec_times)
    executor.lm.model = _TimedModel(real_model, model_times)
    if attention is not None:
        attention.clear()
    try:
        for _ in range(steps):
            t = time.process_time()
            core.step()
            step_times.append(time.process_time() - t)
    finally:
        executor.execute, executor.lm.model = real_execute, real_model
    while core.has_unfinished():
        core.step()
    medians = (1000 * statistics.median(x) for x in (step_times, exec_times, model_times))
    return tuple(medians)  # type: ignore[return-value]


class _TimedModel:
    """Forwards to the model, timing only ``__call__`` (the forward pass)."""

    def __init__(self, model, sink: list[float]) -> None:
        self._model, self._sink = model, sink

    def __call__(self, *args, **kwargs):
        return _timed(self._model, self._sink)(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quantization", default="none", choices=("none", "int8", "int4", "gguf"))
    ap.add_argument("--quant-crossover-rows", type=int, default=None, help="default: measured at start-up")
    ap.add_argument("--quant-large-kernel", default="auto", help="the large-step copy (auto, bfloat16, float32, int8, "
                    "int8blk; docs/engine.md)")
    ap.add_argument("--layers", default="cpp", help="cpp (the C++ decode layers where they apply), python, "
                    "or both: cpp,python")
    ap.add_argument("--kv-cache-dtype", default="auto", help="KV cache precision (docs/engine.md)")
    ap.add_argument("--attention", default="cpp", help="cpp (the C++ in-place decode attention, when built), "
                    "torch (the gather path), or both: cpp,torch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads, max_num_batched_tokens=2048,
              max_num_seqs=256, quantization=args.quantization, quant_crossover_rows=args.quant_crossover_rows,
              quant_large_kernel=args.quant_large_kernel, kv_cache_dtype=args.kv_cache_dtype)
    print(f"{args.dtype}, quantization {args.quantization}, KV cache {args.kv_cache_dtype}, {args.threads} "
          f"thread(s), 128-token prompts, median CPU ms of {args.steps} decode steps")
    model = llm.engine.core.executor.lm.model
    fused, kernel = model.fused, model.decode_kernel
    print("| batch | layers | attention | step ms | executor ms | model forward ms | C++ decode attention ms |\n"
          "|---|---|---|---|---|---|---|")
    calls: list[float] = []
    for b in (int(x) for x in args.batches.split(",")):
        for layers in args.layers.split(","):
            for attn in args.attention.split(","):
                model.fused = fused if layers == "cpp" else None
                timed = attn == "cpp" and kernel is not None
                model.decode_kernel = _timed(kernel, calls) if timed else None
                step, exe, fwd = measure(llm, b, args.steps, attention=calls)
                used = layers if layers == "python" or (b == 1 and fused is not None) else "python (cpp n/a)"
                attn_used = attn if attn == "torch" or kernel is not None else "torch (cpp not built)"
                attn_ms = f"{1000 * sum(calls) / args.steps:.2f}" if timed and calls else "-"
                print(f"| {b} | {used} | {attn_used} | {step:.2f} | {exe:.2f} | {fwd:.2f} | {attn_ms} |", flush=True)
    model.fused, model.decode_kernel = fused, kernel


if __name__ == "__main__":
    main()
