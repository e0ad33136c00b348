"""Batch-1 decode step with the LM head's ``q8_matmul`` from two extension builds, alternating every step.

One engine (``--quantization gguf``, the bundled GGUF); the decode layers are this tree's build, the head's
kernel switches between ``--base`` (another build's ``.so``, e.g. the base tree's, built by
``fused_decode --build`` from that tree) and this tree's build on every other step, so both arms share the
same minutes, cache state and load. Prints the median process CPU time per step, of the decoder layers and
of the head, per arm (1 thread: CPU time is the figure a contended machine keeps).

    PYTHONPATH=src python benchmarks/batch1_head_ab.py --base ~/.cache/inferstack/extensions/inferstack_decode_<hash>
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import torch

from inferstack.engine.llm import LLM, expand_choices
from inferstack.engine.sampling_params import SamplingParams


def load_build(folder: Path) -> ModuleType:
    (path,) = folder.glob("*.so")
    name = path.stem.split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
    loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the other build's folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=3, help="sequences of --steps tokens, one after the other")
    ap.add_argument("--steps", type=int, default=128)
    args = ap.parse_args()
    llm = LLM("smollm2-135m", quantization="gguf", num_threads=args.threads)
    core = llm.engine.core
    model = core.executor.lm.model
    packed = model.lm_head.packed
    arms = {"base": load_build(args.base), "this": packed.kernel}
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    arm = ["base"]

    def timed(fn, part):
        def call(*a):
            start = time.process_time()
            out = fn(*a)
            times[arm[0], part].append(time.process_time() - start)
            return out
        return call

    model.compute_logits = timed(model.compute_logits, "head")
    layers = model.fused.run
    model.fused.run = timed(layers, "layers")
    prompt = torch.randint(100, 40000, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    for r in range(args.requests):
        params = SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True)
        (request,) = expand_choices(f"ab{r}", prompt, params, time.monotonic(), frozenset())
        core.add_request(request)
        core.step()   # prefill
        for i in range(args.steps):
            arm[0] = ("base", "this")[i % 2]
            packed.kernel = arms[arm[0]]
            timed(core.step, "step")()
    for name in arms:
        parts = " ".join(f"{p} {1e3 * statistics.median(times[name, p]):.3f}" for p in ("step", "layers", "head"))
        print(f"{name}: {parts} ms (median CPU time per step, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
