"""Fit a hardware profile to measured step times (what `inferstack engine calibrate` does for `cpu`).

The model is the one the emulator uses: t = max(FLOPs/F, bytes/(BW·g)) + t_step + t_seq·B + t_tok·T,
with efficiencies folded into F and BW, and g (`single_row_bw_gain`) > 1 only for one-row steps.
F, BW and g are searched on a grid; for each triple the overheads are a non-negative least-squares
fit (exact, every triple of a gain at once); the triple with the least squared relative error wins.

Engines that served side by side on the same cores (their step logs overlap in time) add one more
linear term: a step runs at 1/(1 + c) of its speed while another engine is mid-step, so its measured
time is t + k·s, s the seconds another engine stepped during it and k = c/(1 + c) (exact for two
engines; with more, s counts neighbour-seconds). k is fitted with the overheads; the profile keeps c
(`Hardware.colocation_slowdown`, what `sim.cores` prices).

The host's speed itself drifts over seconds (other load, frequency; the same on every engine of the host):
`fit_speed_jitter` measures the spread of measured over modelled time across windows of a few seconds, which
`sim.cores.HostSpeed` replays as a seeded speed factor. The fitted prices are the mean; the spread widens
the latencies of lone requests as the live host does, which is what moves a median that sits among them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from inferstack.sim.hardware import Hardware, get_hardware
from inferstack.sim.models import ModelSpec, get_model
from inferstack.sim.perf_model import SeqWork, step_cost, step_time


@dataclass(frozen=True)
class StepSample:
    work: tuple[SeqWork, ...]
    seconds: float
    shared_s: float = 0.0     # seconds of it during which another engine on the same cores was mid-step


def save_step_samples(samples: Sequence[StepSample], path: Path) -> None:
    """One JSON line per measured step: ``{"work": [[context, new_tokens, samples], ...], "seconds": t}``
    (what `inferstack engine calibrate --samples-out` records, to refit or test the fit later)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"work": [[w.context, w.new_tokens, int(w.samples)] for w in s.work],
                                        "seconds": round(s.seconds, 7)}) + "\n" for s in samples))


def load_step_samples(path: Path) -> list[StepSample]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            out.append(StepSample(tuple(SeqWork(int(c), int(p), bool(s)) for c, p, s in rec["work"]),
                                  float(rec["seconds"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a step sample ({e})") from None
    return out


def _read_step_log(path: Path) -> list[tuple[tuple[SeqWork, ...], float, float, bool]]:
    """(work, start, step seconds, busy after it) of each line of a step log. Errors name file:line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read step log: {e.strerror}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
            work = tuple(SeqWork(int(c), int(p), bool(s)) for c, p, s in rec["work"])
            rows.append((work, float(rec["start"]), float(rec["step_s"]), bool(rec["busy"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a step-log line ({e})") from None
    return rows


def _periods(rows: Sequence[tuple[tuple[SeqWork, ...], float, float, bool]]) -> list[float]:
    """Each step's served price: start to the next start while work was left, else the step itself."""
    return [rows[i + 1][1] - start if busy else step_s for i, (_, start, step_s, busy) in enumerate(rows[:-1])] \
        + [rows[-1][2]] * bool(rows)


def served_step_samples(path: Path, skip: int = 2) -> list[StepSample]:
    """Step samples from a serving engine's step log (`engine serve --step-log`, `engine/steplog.py`), each
    priced at what the engine spent on it while serving: from its start to the next step's start while
    work was left (the forward pass, sampling, detokenization, handing tokens to the HTTP side, and any
    wait for the CPU or the GIL in between), or the step itself when the engine went idle after it.
    The first ``skip`` steps (one-off warm-up costs) are left out. Errors name file:line."""
    rows = _read_step_log(path)
    return [StepSample(r[0], d) for r, d in zip(rows, _periods(rows), strict=True)][skip:]


def side_by_side_samples(paths: Sequence[Path], skip: int = 2) -> list[StepSample]:
    """`served_step_samples` of every log, each step with ``shared_s``: the seconds of its served period
    during which the other logs' engines were mid-step (their steps start to start + step seconds; logs
    of runs at other times never overlap, so the logs of several runs can be given together)."""
    return [s for _, s in _timed_side_by_side(paths, skip)]


def _timed_side_by_side(paths: Sequence[Path], skip: int) -> list[tuple[float, StepSample]]:
    """(start, sample) of each step of `side_by_side_samples`, log by log."""
    logs = [_read_step_log(Path(p)) for p in paths]
    spans = [(np.array([r[1] for r in rows]), np.array([r[1] + r[2] for r in rows])) for rows in logs]
    out = []
    for i, rows in enumerate(logs):
        for r, d in list(zip(rows, _periods(rows), strict=True))[skip:]:
            a, b = r[1], r[1] + d
            shared = sum(float(np.clip(np.minimum(b, ends) - np.maximum(a, starts), 0.0, None).sum())
                         for j, (starts, ends) in enumerate(spans) if j != i)
            out.append((a, StepSample(r[0], d, shared)))
    return out


def fit_served_steps(model: str, step_logs: Sequence[Path],
                     colocation: bool = True) -> tuple[Hardware, dict[str, float]]:
    """The `cpu` profile fitted on serving engines' step logs (`side_by_side_samples` of the files): with
    ``colocation``, the slowdown while another engine steps too and the host's speed drift (`fit_speed_jitter`);
    without, every step at its own shape's price."""
    timed = _timed_side_by_side([Path(p) for p in step_logs], 2)
    samples = [s for _, s in timed]
    if not colocation:
        samples = [replace(s, shared_s=0.0) for s in samples]
    spec = get_model(model)
    hw, report = fit_hardware(spec, samples, get_hardware("cpu"), mean_unbiased=True)
    if colocation:
        sigma, corr = fit_speed_jitter(spec, hw, timed)
        hw = replace(hw, speed_jitter=sigma, speed_jitter_corr=corr)
        report = {**report, "speed_jitter": sigma, "speed_jitter_corr": corr}
    return hw, report


def fit_speed_jitter(model: ModelSpec, hw: Hardware, timed: Sequence[tuple[float, StepSample]],
                     min_steps: int = 5) -> tuple[float, float]:
    """(sigma, corr) of the host's speed factor over windows of ``hw.speed_jitter_s`` (`sim.cores.HostSpeed`):
    each window's log of measured over modelled seconds (all engines' steps starting in it, at ``hw``'s prices
    with its co-location term), the spread of those logs less what the steps' own scatter puts into a window
    of n steps (its per-step variance / n), and the correlation of consecutive windows. Windows of fewer than
    ``min_steps`` steps are left out; fewer than 4 windows: no drift (0, 0)."""
    k = hw.colocation_slowdown / (1.0 + hw.colocation_slowdown)
    windows: dict[int, list[tuple[float, float]]] = {}
    for start, s in timed:
        windows.setdefault(int(start // hw.speed_jitter_s), []).append(
            (s.seconds, step_time(model, hw, s.work) + k * s.shared_s))
    logs, noise = {}, []
    for i, pairs in windows.items():
        if len(pairs) >= min_steps:
            t, pred = np.array(pairs).T
            logs[i] = float(np.log(t.sum() / pred.sum()))
            noise.append(float(np.var(np.log(t / pred), ddof=1)) / len(pairs))
    if len(logs) < 4:
        return 0.0, 0.0
    x = np.array(list(logs.values()))
    var = max(0.0, float(np.var(x, ddof=1)) - float(np.mean(noise)))
    if var == 0.0:
        return 0.0, 0.0
    mean = float(x.mean())
    pairs = [(logs[i] - mean, logs[i + 1] - mean) for i in sorted(logs) if i + 1 in logs]
    corr = float(np.mean([a * b for a, b in pairs])) / var if len(pairs) >= 3 else 0.0
    return float(np.sqrt(var)), min(max(corr, 0.0), 0.9)


def _nonneg_fits(x: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row y of ``ys``: min |x·c - y|² over c >= 0, exactly, for all rows at once. With 3 unknowns
    every support (subset of columns) is tried: the optimum is the least-error support whose
    unconstrained solution is non-negative. Returns (coefficients (G, k), mean squared errors (G,))."""
    g, k = ys.shape[0], x.shape[1]
    best_err, best = np.full(g, np.inf), np.zeros((g, k))
    for mask in itertools.product((False, True), repeat=k):
        cols = np.flatnonzero(mask)
        sol = ys @ np.linalg.pinv(x[:, cols]).T if cols.size else np.zeros((g, 0))
        err = ((ys - sol @ x[:, cols].T) ** 2).mean(axis=1)
        err[(sol < 0).any(axis=1)] = np.inf
        better = err < best_err
        best_err[better] = err[better]
        best[better] = 0.0
        if cols.size:
            best[np.ix_(better, cols)] = sol[better]
    return best, best_err


def fit_hardware(model: ModelSpec, samples: Sequence[StepSample], base: Hardware,
                 mean_unbiased: bool = False) -> tuple[Hardware, dict[str, float]]:
    """Fit on the squared relative error (each step weighted by 1/measured). With ``mean_unbiased`` a
    second pass weights by 1/first-fit prediction instead: noisy steps of one shape are then fitted at their
    mean, not below it (1/measured favours the fast ones), which is what latencies summed over steps need.
    Samples with ``shared_s`` fit the co-location slowdown too (none: it stays 0, the fit is as before)."""
    if len(samples) < 4:
        raise ValueError(f"need at least 4 measured steps to calibrate, got {len(samples)}")
    unit = replace(base, peak_flops=1.0, mem_bandwidth=1.0, mfu_prefill=1.0, mfu_decode=1.0, bw_efficiency=1.0,
                   step_overhead_s=0.0, seq_overhead_s=0.0, token_overhead_s=0.0, colocation_slowdown=0.0)
    costs = [step_cost(model, unit, s.work) for s in samples]
    flops = np.array([c.flops for c in costs])
    nbytes = np.array([c.bytes for c in costs])
    t = np.array([s.seconds for s in samples])
    shared = np.array([s.shared_s for s in samples])
    feats = np.array([[1.0, len(s.work), sum(w.new_tokens for w in s.work)] for s in samples])
    if shared.any():
        feats = np.column_stack([feats, shared])

    def predict(hw: Hardware) -> np.ndarray:
        k = hw.colocation_slowdown / (1.0 + hw.colocation_slowdown)
        return np.array([step_time(model, hw, s.work) for s in samples]) + k * shared

    hw = _grid_fit(unit, flops, nbytes, t, feats, 1.0 / t)
    if mean_unbiased:
        hw = _grid_fit(unit, flops, nbytes, t, feats, 1.0 / predict(hw))
    pred = predict(hw)
    rel = np.abs(pred - t) / t
    return hw, {"steps": len(samples), "median_rel_error": float(np.median(rel)), "mean_rel_error": float(rel.mean()),
                "p90_rel_error": float(np.percentile(rel, 90)), "mean_ratio": float(pred.sum() / t.sum()),
                "colocation_slowdown": hw.colocation_slowdown, "shared_share": float(shared.sum() / t.sum())}


def _grid_fit(unit: Hardware, flops: np.ndarray, nbytes: np.ndarray, t: np.ndarray, feats: np.ndarray,
              w: np.ndarray) -> Hardware:
    """F, BW and the one-row gain on a grid, the three overheads (and the co-location term k when ``feats``
    has a fourth column, the shared seconds) exactly (non-negative), minimising the squared error of each
    step weighted by ``w``."""
    one_row = feats[:, 2] == 1
    fs, bws = np.meshgrid(np.logspace(8.5, 13, 46), np.logspace(8.5, 12, 36), indexing="ij")
    fs, bws = fs.ravel(), bws.ravel()
    best: tuple[float, float, float, float, np.ndarray] | None = None
    for gain in np.arange(1.0, 2.01, 0.05) if one_row.any() else (1.0,):
        # every (F, BW) pair of the grid at once: rows are pairs, columns samples
        roof = np.maximum(flops / fs[:, None], nbytes / (bws[:, None] * np.where(one_row, gain, 1.0)))
        coefs, errs = _nonneg_fits(feats * w[:, None], (t - roof) * w)
        i = int(np.argmin(errs))
        if best is None or errs[i] < best[0]:
            best = (float(errs[i]), fs[i], bws[i], float(gain), coefs[i])
    assert best is not None
    _, f, bw, gain, coef = best
    # k = c/(1 + c) < 1: a step cannot stop while a neighbour runs; capped at c = 9 (a tenth of its speed)
    k = min(float(coef[3]), 0.9) if len(coef) > 3 else 0.0
    return replace(unit, peak_flops=float(f), mem_bandwidth=float(bw), single_row_bw_gain=float(gain),
                   step_overhead_s=float(coef[0]), seq_overhead_s=float(coef[1]), token_overhead_s=float(coef[2]),
                   colocation_slowdown=k / (1.0 - k))
