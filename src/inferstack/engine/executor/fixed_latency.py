"""Fixed-latency step timing for the emulated engine: llm-d-inference-sim's latency settings
(`--time-to-first-token`, `--inter-token-latency`, `--prefill-overhead`, `--prefill-time-per-token`,
`--time-factor-under-load`) on our step model, so recipes written for that simulator run against
`inferstack engine inference-sim` (docs/simulator.md, "llm-d-inference-sim flags").

The scheduler still batches as the real engine does; only the time a step holds changes: a step lasts
as long as its slowest sequence needs — a prompt chunk its prefill latency, a decode one inter-token
latency — times the load factor of the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferstack.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class FixedLatency:
    ttft_s: float = 0.0                 # constant: a prompt's time to its first token
    itl_s: float = 0.0                  # each further token
    prefill_overhead_s: float = 0.0     # per-token calculator: TTFT = overhead + uncached tokens x per_token
    prefill_per_token_s: float = 0.0
    per_token: bool = False             # True: the per-token calculator; False: constant TTFT
    load_factor: float = 1.0            # latency x this at max_num_seqs running (linear from 1 at one)
    max_num_seqs: int = 5

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s", "prefill_overhead_s", "prefill_per_token_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.load_factor < 1.0:
            raise ValueError(f"the time factor under load must be >= 1, got {self.load_factor}")

    def step_time(self, batch: SchedulerOutput) -> float:
        worst = 0.0
        for s in batch.seqs:
            req = s.request
            if s.start >= req.num_prompt_tokens:         # decoding
                t = self.itl_s
            elif self.per_token:
                first_chunk = s.start <= max(req.num_cached_tokens, 0)
                t = (self.prefill_overhead_s if first_chunk else 0.0) + s.num_new_tokens * self.prefill_per_token_s
            else:                                        # constant TTFT, spread over the prompt's chunks
                uncached = max(1, req.num_prompt_tokens - max(req.num_cached_tokens, 0))
                t = self.ttft_s * s.num_new_tokens / uncached
            worst = max(worst, t)
        n = len(batch.seqs)
        span = max(1, self.max_num_seqs - 1)
        return worst * (1.0 + (self.load_factor - 1.0) * min(1.0, (n - 1) / span))
