"""One request as the client saw it, with the metric definitions of docs/architecture.md.

Times are seconds on the run clock (0 = run start). For a request sent at `t0` with content chunks
at `t1..tk` and `n` output tokens: TTFT = t1 − t0, E2E = tk − t0, TPOT = (E2E − TTFT)/(n − 1),
ITL = the gaps t(i+1) − t(i).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OK = "ok"


@dataclass
class RequestRecord:
    index: int
    unit: int
    stage: int
    scheduled: float                 # intended send time (open loop) or send time (closed loop)
    sent: float = 0.0
    end: float = 0.0
    status: str = OK                 # ok | http_<code> | timeout | stalled | connection | cancelled | bad_response
    error: str = ""
    input_tokens_nominal: int = 0
    output_tokens_nominal: int = 0
    prompt_tokens: int | None = None     # server usage
    cached_tokens: int | None = None     # usage.prompt_tokens_details.cached_tokens
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)    # content chunks, run clock
    streamed: bool = True
    session: str | None = None
    group: str | None = None
    target: str = ""
    included: bool = True            # inside the measurement window (not warm-up/cool-down)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def ttft(self) -> float | None:
        if not self.ok or not self.streamed or not self.chunk_times:
            return None
        return self.chunk_times[0] - self.sent

    @property
    def e2e(self) -> float | None:
        if not self.ok:
            return None
        return (self.chunk_times[-1] if self.chunk_times else self.end) - self.sent

    @property
    def tpot(self) -> float | None:
        ttft, e2e = self.ttft, self.e2e
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    @property
    def e2e_per_token(self) -> float | None:
        """guidellm's "TPOT" / inference-perf's NTPOT: E2E / n, TTFT included."""
        e2e = self.e2e
        if e2e is None or self.output_tokens < 1:
            return None
        return e2e / self.output_tokens

    @property
    def itls(self) -> np.ndarray:
        if not self.ok or len(self.chunk_times) < 2:
            return np.empty(0)
        # np.diff's own arithmetic (a[1:] - a[:-1]) without its wrapper: every finished request of a
        # million-request simulation comes here
        times = np.fromiter(self.chunk_times, dtype=np.float64, count=len(self.chunk_times))
        return times[1:] - times[:-1]

    @property
    def itl_mean(self) -> float | None:
        gaps = self.itls
        return float(gaps.mean()) if gaps.size else None

    @property
    def schedule_lag(self) -> float:
        return self.sent - self.scheduled

    def to_row(self) -> dict[str, object]:
        gaps = self.itls
        return {
            "index": self.index, "unit": self.unit, "stage": self.stage, "target": self.target,
            "status": self.status, "error": self.error, "included": self.included,
            "scheduled_s": round(self.scheduled, 6), "sent_s": round(self.sent, 6), "end_s": round(self.end, 6),
            "input_tokens_nominal": self.input_tokens_nominal, "output_tokens_nominal": self.output_tokens_nominal,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens, "chunks": len(self.chunk_times),
            "ttft_s": self.ttft, "tpot_s": self.tpot, "e2e_s": self.e2e, "e2e_per_token_s": self.e2e_per_token,
            # ndarray.mean / .max are these reductions (pairwise sum / count), called directly
            "itl_mean_s": float(np.add.reduce(gaps) / gaps.size) if gaps.size else None,
            "itl_max_s": float(np.maximum.reduce(gaps)) if gaps.size else None,
            "session": self.session, "group": self.group,
        }
