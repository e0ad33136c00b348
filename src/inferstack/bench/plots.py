"""PNG plots (matplotlib, Agg): latency CDFs and server timelines per run; metrics vs offered rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from inferstack.bench.runner import RunResult


def _cdf(ax: plt.Axes, values: np.ndarray, label: str) -> None:
    if values.size:
        x = np.sort(values) * 1e3
        ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)
        if x[0] > 0 and x[-1] / max(np.median(x), 1e-9) > 20:
            ax.set_xscale("log")       # a long tail would squeeze the body of the distribution


def plot_run(res: RunResult, out: Path) -> None:
    ok = [r for r in res.records if r.ok and r.included]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    series = {
        "TTFT": np.array([r.ttft for r in ok if r.ttft is not None]),
        "TPOT": np.array([r.tpot for r in ok if r.tpot is not None]),
        "ITL": np.concatenate([r.itls for r in ok]) if ok else np.empty(0),
        "E2E": np.array([r.e2e for r in ok if r.e2e is not None]),
    }
    for ax, (name, vals) in zip(axes, series.items(), strict=True):
        _cdf(ax, vals, name)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=90)
    plt.close(fig)
    if res.timeline:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
        targets = sorted({int(s["target"]) for s in res.timeline})
        for i in targets:
            mine = [s for s in res.timeline if s["target"] == i]
            t = [s["t"] for s in mine]
            for ax, key in zip(axes[:2], ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"), strict=True):
                if any(key in s for s in mine):
                    ax.plot(t, [s.get(key, np.nan) for s in mine], label=f"target {i}")
                    ax.set_title(key)
            q = np.array([s.get("vllm:prefix_cache_queries", np.nan) for s in mine])
            h = np.array([s.get("vllm:prefix_cache_hits", np.nan) for s in mine])
            if len(q) > 1 and np.isfinite(q).all():
                dq, dh = np.diff(q), np.diff(h)
                with np.errstate(invalid="ignore", divide="ignore"):
                    axes[2].plot(t[1:], np.where(dq > 0, dh / dq, np.nan), label=f"target {i}")
        axes[2].set_title("prefix cache hit rate (per interval)")
        for ax in axes:
            ax.set_xlabel("s")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "server_timeline.png", dpi=90)
        plt.close(fig)


def plot_series(rows: list[dict[str, object]], path: Path) -> None:
    rows = [r for r in rows if r["target_rate"] is not None] or rows
    x = [float(r["target_rate"] or r["requests_per_s"]) for r in rows]  # type: ignore[arg-type]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("TTFT (ms)", ("ttft_p50_ms", "ttft_p99_ms")), ("ITL (ms)", ("itl_p50_ms", "itl_p99_ms")),
              ("throughput", ("requests_per_s", "output_tokens_per_s")), ("prefix hit rate", ("prefix_hit_rate",))]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for k in keys:
            y = [np.nan if r[k] is None else float(r[k]) for r in rows]  # type: ignore[arg-type]
            if title == "throughput" and k == "output_tokens_per_s":
                ax2 = ax.twinx()
                ax2.plot(x, y, "s--", color="tab:orange", label="out tok/s")
                ax2.set_ylabel("output tok/s")
            else:
                ax.plot(x, y, "o-", label=k)
        ax.set_title(title)
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
