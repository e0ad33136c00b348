"""`tuning`: the batch size knob (max_num_seqs) on an emulated fleet, swept under one load:
throughput and TTFT move in opposite directions, and the knee is where a bigger batch stops paying.
Every batch size gets a stack of its own (the knob is an engine flag), all side by side under the same
load at the same time."""

from __future__ import annotations

import functools

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import compare, completed, latency, ms, req_per_s
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabRun, StackSpec

WORKLOAD = "synthetic:input=512,output=64"


def run(lab: LabRun) -> LabResult:
    batches = (2, 8) if lab.quick else (2, 4, 8, 16, 32)
    duration, rate = (8.0, 2.5) if lab.quick else (30.0, 4.0)
    specs = [StackSpec(config={"up": {"emulate": "l4:llama-3-8b", "replicas": 2,
                                      "engine_args": ["--max-num-seqs", str(b)]}}) for b in batches]
    with lab.stacks(*specs) as stacks:
        summaries = lab.together(*(functools.partial(lab.bench, stack.gateway, WORKLOAD, f"max-num-seqs-{b}",
                                                     rate=rate, duration=duration)
                                   for b, stack in zip(batches, stacks, strict=True)))
    rows = [[b, completed(s), req_per_s(s), s["throughput"]["output_tokens_per_s"], ms(latency(s, "ttft", "p90")),
             ms(latency(s, "tpot", "p50"))] for b, s in zip(batches, summaries, strict=True)]
    best = max(rows, key=lambda r: r[2])
    small, large = rows[0], rows[-1]
    findings = [
        f"Throughput: {small[2]:.1f} req/s at max_num_seqs={small[0]}, best {best[2]:.1f} req/s at {best[0]} "
        f"(offered {rate:g} req/s).",
        compare("TTFT p90", f"max_num_seqs={small[0]}", small[4], f"max_num_seqs={large[0]}", large[4])
        + ": a small batch makes requests queue for a slot.",
        compare("TPOT p50", f"max_num_seqs={small[0]}", small[5], f"max_num_seqs={large[0]}", large[5])
        + ": a large batch makes every decode step longer.",
        "Pick the smallest batch that carries the load at the TTFT you need; past it you only buy longer steps.",
    ]
    plot = bar_plot(lab.out / "throughput.png", "Output tokens/s by max_num_seqs", "tokens/s",
                    {"output tok/s": [r[3] for r in rows]}, [str(r[0]) for r in rows])
    table = Table(f"{WORKLOAD} at {rate:g} req/s for {duration:g} s, 2 emulated L4 engines",
                  ["max_num_seqs", "completed", "req/s", "output tok/s", "TTFT p90 (ms)", "TPOT p50 (ms)"], rows)
    return LabResult(findings, [table], [plot], {"rows": rows})


LAB = Lab(
    name="tuning", week=4, title="Performance tuning: the batch size knob",
    question="How does the engine's batch size trade throughput against latency?",
    teaches="max_num_seqs sweep on an emulated fleet: throughput, TTFT, TPOT",
    needs=("2 emulated L4 engines", "gateway", "bench"), minutes=3.0, run=run)
