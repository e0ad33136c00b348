"""A lab's report: report.md (question, setup, findings in plain words, tables, plots),
results.json (the same numbers, machine-readable) and the PNG plots next to them."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from inferstack.lab.base import Lab, LabResult, Table


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "–" if v is None else str(v)


def _table_md(t: Table) -> str:
    head = f"**{t.title}**\n\n| " + " | ".join(t.columns) + " |\n|" + "---|" * len(t.columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(v) for v in row) + " |\n" for row in t.rows)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def write_report(lab: Lab, result: LabResult, out: Path, quick: bool, setup: list[str], took_s: float) -> Path:
    lines = [f"# Lab `{lab.name}`: {lab.title}", "", f"**Question.** {lab.question}", "",
             "## Setup", "", *[f"- {s}" for s in setup],
             f"- Machine: {machine()}; run took {took_s:.0f} s"
             f"{' (--quick: short runs, noisier numbers)' if quick else ''}.",
             "", "## Findings", "", *[f"- {f}" for f in result.findings], "", "## Results", ""]
    for t in result.tables:
        lines += [_table_md(t), ""]
    for p in result.plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    lines += ["## Reproduce", "", f"    inferstack lab run {lab.name}{' --quick' if quick else ''} --out DIR", "",
              "Every number above comes from this run only.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({
        "lab": lab.name, "title": lab.title, "question": lab.question, "quick": quick,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "took_s": took_s, "setup": setup,
        "findings": result.findings, "tables": [t.__dict__ for t in result.tables],
        "plots": [p.name for p in result.plots], "data": result.data}, indent=2, default=str))
    return report


def _axes(figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=110)


def _save(fig, ax, path: Path, title: str, ylabel: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def time_plot(path: Path, title: str, panels: list[tuple[str, dict[str, list[tuple[float, float | None]]],
                                                        float | None]]) -> Path:
    """Stacked panels over a shared time axis (seconds): each panel is (y label, {series: [(t, v)]},
    an optional horizontal reference line such as an objective); None values leave gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 2.4 * len(panels)), dpi=110, sharex=True, squeeze=False)
    for ax, (ylabel, series, ref) in zip(axes[:, 0], panels, strict=True):
        for name, points in series.items():
            ax.step([t for t, _ in points], [float("nan") if v is None else v for _, v in points], where="post",
                    label=name)
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=0.8, label="objective")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("time (virtual s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(path: Path, title: str, ylabel: str, series: dict[str, list[float]], groups: list[str]) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    fig, ax = _axes((7, 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, ax, path, title, ylabel)


def line_plot(path: Path, title: str, xlabel: str, ylabel: str, x: list[float],
              series: dict[str, list[float | None]], log: bool = True, dashed: tuple[str, ...] = ()) -> Path:
    """One line per series over ``x`` (log-log by default); series named in ``dashed`` are drawn dashed
    (modelled, not measured). None values are left out."""
    fig, ax = _axes((7, 3.8))
    for name, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=name,
                linestyle="--" if name in dashed else "-")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, ax, path, title, ylabel)
