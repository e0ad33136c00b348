"""`inferstack bench compare DIR...`: runs side by side, from their results.json."""

from __future__ import annotations

import json
from pathlib import Path


class CompareError(ValueError):
    pass


def _load(d: Path) -> dict:
    path = d / "results.json" if d.is_dir() else d
    if not path.is_file():
        raise CompareError(f"{d}: no results.json (pass a directory written by `inferstack bench run`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def compare(dirs: list[Path]) -> str:
    runs = [(d, _load(d)) for d in dirs]
    rows: list[tuple[str, list[str]]] = []

    def lat(s: dict, k: str, p: str) -> str:
        d = s["latency_s"].get(k)
        return "–" if not d else f"{d[p] * 1e3:.1f}"

    def add(name: str, fn) -> None:   # type: ignore[no-untyped-def]
        cells = []
        for _, r in runs:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError):
                cells.append("–")
        rows.append((name, cells))

    add("workload", lambda r: r["config"]["workload"])
    add("load", lambda r: r["config"]["load"]["label"])
    add("completed / failed",
        lambda r: f"{r['summary']['requests']['completed']} / {r['summary']['requests']['failed']}")
    add("requests/s", lambda r: f"{r['summary']['throughput']['requests_per_s']:.2f}")
    add("output tok/s", lambda r: f"{r['summary']['throughput']['output_tokens_per_s']:.1f}")
    for k, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        for p in ("mean", "p50", "p99"):
            add(f"{label} {p} (ms)", lambda r, k=k, p=p: lat(r["summary"], k, p))
    add("SLO attainment", lambda r: f"{r['summary']['slo']['attainment']:.1%}")
    add("goodput req/s", lambda r: f"{r['summary']['slo']['goodput_requests_per_s']:.2f}")
    add("prefix hit rate (server)", lambda r: f"{r['server']['prefix_cache_hit_rate']:.1%}")
    header = "| metric | " + " | ".join(d.name or str(d) for d, _ in runs) + " |"
    lines = [header, "|---|" + "---|" * len(runs)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"
