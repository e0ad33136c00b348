"""Open-loop arrival times, as offsets from the run start (never accumulated sleeps)."""

from __future__ import annotations

import numpy as np

ARRIVALS = ("poisson", "constant", "gamma")


def arrival_times(kind: str, rate: float, duration: float, rng: np.random.Generator,
                  burstiness: float = 1.0) -> np.ndarray:
    """Times in [0, duration) of a process with mean `rate` per second.

    gamma: inter-arrival ~ Gamma(shape=burstiness, scale=1/(rate·burstiness)) as in `vllm bench serve`;
    burstiness 1 is Poisson, < 1 burstier, > 1 smoother.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrival process {kind!r}; use {', '.join(ARRIVALS)}")
    if kind == "constant":
        return np.arange(0.0, duration, 1.0 / rate)
    if kind == "gamma" and burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    shape = 1.0 if kind == "poisson" else burstiness
    expected = int(rate * duration * 1.2 + 10 * np.sqrt(rate * duration + 1) + 10)
    times: list[np.ndarray] = []
    last = 0.0
    while last < duration:
        gaps = rng.gamma(shape, 1.0 / (rate * shape), expected)
        chunk = last + np.cumsum(gaps)
        times.append(chunk)
        last = float(chunk[-1])
    all_times = np.concatenate(times)
    return all_times[all_times < duration]
