"""Fit a hardware profile to measured step times (what `inferstack engine calibrate` does for `cpu`).

The model is the one the emulator uses: t = max(FLOPs/F, bytes/(BW·g)) + t_step + t_seq·B + t_tok·T,
with efficiencies folded into F and BW, and g (`single_row_bw_gain`) > 1 only for one-row steps.
F, BW and g are searched on a grid; for each triple the overheads are a non-negative least-squares
fit; the triple with the least squared relative error wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from inferstack.sim.hardware import Hardware
from inferstack.sim.models import ModelSpec
from inferstack.sim.perf_model import SeqWork, step_cost, step_time


@dataclass(frozen=True)
class StepSample:
    work: tuple[SeqWork, ...]
    seconds: float


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: drop negative ones and refit (3 unknowns, so this ends fast)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active = [a for a, s in zip(active, sol, strict=True) if s > 0]
    return coef


def fit_hardware(model: ModelSpec, samples: Sequence[StepSample], base: Hardware) -> tuple[Hardware, dict[str, float]]:
    if len(samples) < 4:
        raise ValueError(f"need at least 4 measured steps to calibrate, got {len(samples)}")
    unit = replace(base, peak_flops=1.0, mem_bandwidth=1.0, mfu_prefill=1.0, mfu_decode=1.0, bw_efficiency=1.0,
                   step_overhead_s=0.0, seq_overhead_s=0.0, token_overhead_s=0.0)
    costs = [step_cost(model, unit, s.work) for s in samples]
    flops = np.array([c.flops for c in costs])
    nbytes = np.array([c.bytes for c in costs])
    t = np.array([s.seconds for s in samples])
    feats = np.array([[1.0, len(s.work), sum(w.new_tokens for w in s.work)] for s in samples])
    one_row = feats[:, 2] == 1
    w = 1.0 / t                                   # relative error: weight rows by 1/t
    best: tuple[float, float, float, float, np.ndarray] | None = None
    for gain in np.arange(1.0, 2.01, 0.05) if one_row.any() else (1.0,):
        for f in np.logspace(8.5, 13, 46):
            for bw in np.logspace(8.5, 12, 36):
                roof = np.maximum(flops / f, nbytes / np.where(one_row, bw * gain, bw))
                coef = _nonneg_lstsq(feats * w[:, None], (t - roof) * w)
                err = float(np.mean(((roof + feats @ coef) - t) ** 2 * w**2))
                if best is None or err < best[0]:
                    best = (err, f, bw, gain, coef)
    assert best is not None
    _, f, bw, gain, coef = best
    hw = replace(unit, peak_flops=float(f), mem_bandwidth=float(bw), single_row_bw_gain=float(gain),
                 step_overhead_s=float(coef[0]), seq_overhead_s=float(coef[1]), token_overhead_s=float(coef[2]))
    pred = np.array([step_time(model, hw, s.work) for s in samples])
    rel = np.abs(pred - t) / t
    return hw, {"steps": len(samples), "median_rel_error": float(np.median(rel)), "mean_rel_error": float(rel.mean()),
                "p90_rel_error": float(np.percentile(rel, 90))}
