"""Cost and effect of grammar-constrained decoding on the built-in engine with the bundled SmolLM2.

    python benchmarks/structured_outputs.py [--threads 2] [--batches 1,16] [--steps 24] [--n 100]

1. Per-token cost: decode steps of B requests with the same prompts, unconstrained vs constrained by a
   JSON schema that cannot finish within the run (a long string field), so both run the same steps.
   Process CPU time per step (a loaded machine inflates it far less than wall time; it includes
   llguidance's mask threads), median of ``--steps``, runs interleaved.
   Also the grammar work alone (mask fill + apply), which the model's step time dwarfs on a busy machine.
2. First-token delay from compiling: a small and a large schema, fresh compile vs cache hit.
3. JSON validity: ``--n`` seeded generations (temperature 1) over generated and real-world schemas
   (tests/support/schemas.py), the schema given in the prompt; constrained vs unconstrained.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

from inferstack.engine.llm import LLM, expand_choices
from inferstack.engine.sampling import apply_token_bitmask_
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.structured.compiler import GrammarCompiler
from inferstack.engine.structured.manager import StructuredOutputManager
from inferstack.engine.structured.spec import GrammarSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.schemas import REAL_WORLD, random_schema

LONG = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


def _prompt(llm: LLM, text: str) -> list[int]:
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return llm.tokenizer.encode(chat)


def step_cost(llm: LLM, batch: int, steps: int, constrained: bool) -> float:
    core = llm.engine.core
    grammar = GrammarSpec.json_schema(LONG) if constrained else None
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=steps + 4, ignore_eos=True, structured_outputs=grammar)
    prompt = _prompt(llm, "Write a long story as JSON.")
    for i in range(batch):
        for r in expand_choices(f"c{constrained}-{batch}-{i}", prompt, params, time.monotonic(), frozenset()):
            core.add_request(r)
    while len(core.scheduler.running) < batch or any(r.num_output_tokens == 0 for r in core.scheduler.running):
        core.step()
    core.step()
    times = []
    for _ in range(steps):
        t = time.process_time()
        core.step()
        times.append(time.process_time() - t)
    while core.has_unfinished():
        core.step()
    return statistics.median(times)


def mask_cost(llm: LLM, batches: list[int], iters: int = 50) -> None:
    """The grammar work alone per step: fill the rows' masks and apply them to [B, vocab] logits."""
    structured = llm.engine.core.structured
    assert structured is not None
    grammar = structured.compiler.compile(GrammarSpec.json_schema(LONG))
    prefix = llm.tokenizer.encode('{"story": "Once upon a time')
    print("grammar work per decode step (median process CPU ms: fill masks + apply to logits)")
    for b in batches:
        manager = StructuredOutputManager(structured.compiler, max(b, 16))
        ids = [f"m{i}" for i in range(b)]
        for rid in ids:
            manager.start(rid, grammar)
            for t in prefix:
                manager.advance(rid, t)
        logits = torch.randn(b, structured.compiler.vocab_size)
        times = []
        for _ in range(iters):
            t = time.process_time()
            mask = manager.bitmask(ids)
            assert mask is not None
            apply_token_bitmask_(logits, mask)
            times.append(time.process_time() - t)
        print(f"  batch {b:>3}: {statistics.median(times) * 1e3:.2f} ms")


def compile_delays(llm: LLM) -> dict[str, float]:
    rng = random.Random(3)
    large = {"type": "object", "properties": {f"f{i}": random_schema(rng) for i in range(120)},
             "required": [f"f{i}" for i in range(120)]}
    out = {}
    compiler = GrammarCompiler(llm.tokenizer, llm.tokenizer.vocab_size, timeout_s=60)
    assert compiler.lltokenizer.vocab_size      # built once per engine, at its start
    for name, schema in (("small", REAL_WORLD["sentiment"]), ("large (120 nested objects)", large)):
        spec = GrammarSpec.json_schema(schema)
        t = time.perf_counter()
        compiler.compile(spec)
        out[f"{name}, fresh"] = time.perf_counter() - t
        t = time.perf_counter()
        compiler.compile(spec)
        out[f"{name}, cached"] = time.perf_counter() - t
    compiler.shutdown()
    return out


def validity(llm: LLM, n: int, max_tokens: int, constrained: bool) -> tuple[int, int]:
    """(valid, parseable) out of n."""
    rng = random.Random(11)
    real = list(REAL_WORLD.values())
    schemas = [real[i % len(real)] if i % 4 == 0 else random_schema(rng) for i in range(n)]
    core = llm.engine.core
    for i, schema in enumerate(schemas):
        prompt = _prompt(llm, f"Reply with only a JSON object that follows this JSON schema: {json.dumps(schema)}")
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                structured_outputs=GrammarSpec.json_schema(schema) if constrained else None)
        for r in expand_choices(f"v{constrained}-{i}", prompt, params, time.monotonic(), llm.engine.eos_token_ids):
            core.add_request(r)
    texts = {f"v{constrained}-{i}": "" for i in range(n)}
    while core.has_unfinished():
        for out in core.step():
            texts[out.request_id] += out.new_text
    valid = parsed = 0
    for i, schema in enumerate(schemas):
        try:
            value = json.loads(texts[f"v{constrained}-{i}"].strip().removeprefix("```json").removesuffix("```"))
        except json.JSONDecodeError:
            continue
        parsed += 1
        try:
            jsonschema.validate(value, schema)
            valid += 1
        except jsonschema.ValidationError:
            pass
    return valid, parsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--n", type=int, default=100, help="generations per validity run")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--parts", default="cost,mask,compile,validity", help="which measurements to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    llm = LLM("smollm2-135m", dtype="float32", num_threads=args.threads, max_num_seqs=max(args.n, 16))
    if "cost" in parts:
        per_token_cost(llm, [int(x) for x in args.batches.split(",")], args.steps)
    if "mask" in parts:
        mask_cost(llm, [int(x) for x in args.batches.split(",")])
    if "compile" in parts:
        print("grammar compile delay (s)")
        for k, v in compile_delays(llm).items():
            print(f"  {k:<32} {v:.4f}")
    if "validity" in parts:
        print(f"JSON validity over {args.n} seeded generations (temperature 1, max_tokens {args.max_tokens})")
        for constrained in (True, False):
            valid, parsed = validity(llm, args.n, args.max_tokens, constrained)
            label = "constrained  " if constrained else "unconstrained"
            print(f"  {label}: parse {parsed}/{args.n}, validate {valid}/{args.n}")


def per_token_cost(llm: LLM, batches: list[int], steps: int) -> None:
    print("per-token cost (median process CPU s per decode step)")
    for b in batches:
        free, bound = [], []
        for _ in range(2):
            free.append(step_cost(llm, b, steps, False))
            bound.append(step_cost(llm, b, steps, True))
        f, c = min(free), min(bound)
        print(f"  batch {b:>3}: unconstrained {f * 1e3:7.1f} ms  constrained {c * 1e3:7.1f} ms  "
              f"overhead {100 * (c / f - 1):+5.1f} %")


if __name__ == "__main__":
    main()
