"""`pd`: prefill/decode disaggregation vs colocated serving on an emulated fleet.

Long prompts arriving among short chats stall every decode step of a colocated engine (its steps
carry the prefill), so inter-token latency of the running streams jumps; splitting prefill onto its
own engines keeps decode steps short. Same engines (4 emulated L4s, where an 8k-token prefill takes
about a second), same load, colocated 4 replicas vs 2 prefill + 2 decode, both stacks side by side
(started and measured at the same time, so both see the same machine)."""

from __future__ import annotations

import functools

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import compare, completed, latency, ms, req_per_s
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabRun, StackSpec

WORKLOAD = "synthetic:input=uniform(100,8000),output=64"
FLEETS = (("colocated 4", ["--replicas", "4"]), ("2P2D", ["--prefill", "2", "--decode", "2"]))


def run(lab: LabRun) -> LabResult:
    duration, rate = (8.0, 2.0) if lab.quick else (40.0, 2.5)
    rows = []
    specs = [StackSpec(("--emulate", "l4:llama-3-8b", *args)) for _, args in FLEETS]
    with lab.stacks(*specs) as stacks:
        summaries = lab.together(*(functools.partial(lab.bench, stack.gateway, WORKLOAD, name.replace(" ", "-"),
                                                     rate=rate, duration=duration)
                                   for (name, _), stack in zip(FLEETS, stacks, strict=True)))
    for (name, _), s in zip(FLEETS, summaries, strict=True):
        rows.append([name, completed(s), req_per_s(s), ms(latency(s, "ttft", "p50")), ms(latency(s, "ttft", "p90")),
                     ms(latency(s, "itl", "p50")), ms(latency(s, "itl", "p99"))])
    colo, pd = rows
    findings = [
        compare("ITL p99 of the running streams", "colocated", colo[6], "2P2D", pd[6]) + ": a colocated "
        "engine's decode step carries any prefill it schedules, so long prompts stall every stream on it.",
        compare("TTFT p50", "colocated", colo[3], "2P2D", pd[3]) + ": PD pays for the KV transfer and has half "
        "the engines for prefill.",
        "PD wins on streaming smoothness when long prompts mix with chats; it loses when prompts are short "
        "(nothing to isolate) or when the prefill side saturates (docs/disaggregation.md).",
    ]
    plot = bar_plot(lab.out / "itl.png", "Inter-token latency", "ms", {"ITL p50": [r[5] or 0 for r in rows],
                                                                        "ITL p99": [r[6] or 0 for r in rows]},
                    [r[0] for r in rows])
    table = Table(f"{WORKLOAD} at {rate:g} req/s for {duration:g} s, emulated L4 engines",
                  ["fleet", "completed", "req/s", "TTFT p50 (ms)", "TTFT p90 (ms)", "ITL p50 (ms)", "ITL p99 (ms)"],
                  rows)
    return LabResult(findings, [table], [plot], {"rows": rows})


LAB = Lab(
    name="pd", week=2, title="Prefill/decode disaggregation",
    question="When does splitting prefill from decode help, and what does it cost?",
    teaches="colocated vs xPyD: ITL under long prefills, TTFT, throughput",
    needs=("emulated L4 engines with KV transfer (inferstack up --prefill/--decode)", "gateway", "bench"),
    minutes=2.0, run=run)
