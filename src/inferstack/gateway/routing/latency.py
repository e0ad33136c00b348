"""Online TTFT/TPOT model per endpoint, for the predicted-latency scorer.

TTFT is fitted as ``a + b * uncached_ktokens + c * load`` by exponentially weighted recursive
least squares (cheap, no dependencies, adapts when an endpoint slows down); TPOT is an EWMA of
``d + e * load``'s residual-free form (mean per-token time scaled by load).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_FORGET = 0.98  # weight of history per observation: recent behaviour dominates


@dataclass(slots=True)
class _RLS:
    w: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.01])
    p: list[list[float]] = field(
        default_factory=lambda: [[100.0 if i == j else 0.0 for j in range(3)] for i in range(3)])
    n: int = 0

    def predict(self, x: list[float]) -> float:
        return self.w[0] * x[0] + self.w[1] * x[1] + self.w[2] * x[2]

    def update(self, x: list[float], y: float) -> None:
        # unrolled (every completion updates its endpoint's model): each sum is `sum()`'s own float additions
        # in its order, from 0.0, so the weights are bit for bit those of the generator-expression form
        (p0, p1, p2), (x0, x1, x2), w = self.p, x, self.w
        px = [0.0 + p0[0] * x0 + p0[1] * x1 + p0[2] * x2, 0.0 + p1[0] * x0 + p1[1] * x1 + p1[2] * x2,
              0.0 + p2[0] * x0 + p2[1] * x1 + p2[2] * x2]
        denom = _FORGET + (0.0 + x0 * px[0] + x1 * px[1] + x2 * px[2])
        k = [px[0] / denom, px[1] / denom, px[2] / denom]
        err = y - self.predict(x)
        self.w = [w[0] + k[0] * err, w[1] + k[1] * err, w[2] + k[2] * err]
        self.p = [[(row[0] - ki * px[0]) / _FORGET, (row[1] - ki * px[1]) / _FORGET, (row[2] - ki * px[2]) / _FORGET]
                  for row, ki in zip((p0, p1, p2), k, strict=True)]
        self.n += 1


@dataclass(slots=True)
class LatencyModel:
    ttft: dict[str, _RLS] = field(default_factory=dict)
    tpot: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _x(uncached_tokens: float, load: float) -> list[float]:
        return [1.0, uncached_tokens / 1000.0, load]

    def predict_ttft(self, endpoint: str, uncached_tokens: float, load: float) -> float:
        m = self.ttft.get(endpoint)
        if m is None:
            m = _RLS()
        return max(1e-4, m.predict(self._x(uncached_tokens, load)))

    def predict_tpot(self, endpoint: str) -> float:
        return self.tpot.get(endpoint, 0.02)

    def observe(self, endpoint: str, uncached_tokens: float, load: float, ttft_s: float,
                tpot_s: float | None = None) -> None:
        m = self.ttft.get(endpoint)
        if m is None:
            m = self.ttft[endpoint] = _RLS()
        m.update(self._x(uncached_tokens, load), ttft_s)
        if tpot_s is not None and tpot_s > 0:
            old = self.tpot.get(endpoint)
            self.tpot[endpoint] = tpot_s if old is None else 0.9 * old + 0.1 * tpot_s
