"""Run reports: results.json (summary + per-request), requests.csv, report.md, PNG plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from inferstack.bench.metrics import DEFINITIONS
from inferstack.bench.runner import RunResult

_LAT_ROWS = ("ttft", "tpot", "itl", "e2e", "e2e_per_token")


def _ms(d: dict | None, key: str) -> str:
    return "–" if not d else f"{d[key] * 1e3:.1f}"


def result_json(res: RunResult) -> dict[str, object]:
    return {"config": res.config, "summary": res.summary, "server": res.server, "wall_s": res.wall_s,
            "requests": [r.to_row() for r in res.records]}


def markdown(res: RunResult, title: str = "Benchmark run") -> str:
    s, cfg = res.summary, res.config
    req, thr = s["requests"], s["throughput"]  # type: ignore[index]
    lat = s["latency_s"]  # type: ignore[index]
    load = s["load"]  # type: ignore[index]
    lines = [f"# {title}", "",
             f"- targets: {', '.join(cfg['targets'])} · model `{cfg['model']}`",  # type: ignore[arg-type]
             f"- workload: {cfg['workload']}",
             f"- load: {cfg['load']['label']} · duration {cfg['duration_s']} s · warm-up {cfg['warmup_s']} s · "  # type: ignore[index]
             f"cool-down {cfg['cooldown_s']} s · seed {cfg['seed']}",
             f"- requests: {req['sent']} sent in window, {req['completed']} completed, {req['failed']} failed "
             f"{req['by_status']}; {req['excluded_warmup_cooldown']} excluded (warm-up/cool-down)", ""]
    if load["target_rate"] or load["planned_rate"]:
        lag = load["schedule_lag_s"] or {}
        rate, planned = load["send_rate"], load["planned_rate"]
        if rate and planned:
            lines += [f"- send rate {rate:.2f}/s vs planned {planned:.2f}/s ({(rate / planned - 1) * 100:+.2f}%; "
                      f"target {load['target_rate'] or '–'}/s); schedule lag p50 {_ms(lag, 'p50')} ms, "
                      f"p99 {_ms(lag, 'p99')} ms", ""]
    lines += ["| throughput | value |", "|---|---|",
              f"| requests/s | {thr['requests_per_s']:.2f} |",
              f"| output tokens/s | {thr['output_tokens_per_s']:.1f} |",
              f"| input tokens/s | {thr['input_tokens_per_s']:.1f} |", "",
              "| metric (ms) | mean | p50 | p90 | p95 | p99 | max | n |", "|---|---|---|---|---|---|---|---|"]
    for key in _LAT_ROWS:
        d = lat[key]
        lines.append(f"| {key.upper() if key != 'e2e_per_token' else 'E2E/n'} | {_ms(d, 'mean')} | {_ms(d, 'p50')} | "
                     f"{_ms(d, 'p90')} | {_ms(d, 'p95')} | {_ms(d, 'p99')} | {_ms(d, 'max')} | "
                     f"{d['count'] if d else 0} |")
    if "slo" in s:
        slo = s["slo"]
        lines += ["", f"- SLO {', '.join(f'{k} ≤ {v * 1e3:g} ms' for k, v in slo['spec'].items())}: attainment "
                  f"{slo['attainment']:.1%} (target {slo['attainment_target']:.0%}), goodput "
                  f"{slo['goodput_requests_per_s']:.2f} req/s"]
    srv = res.server
    if srv.get("available"):
        hit = srv.get("prefix_cache_hit_rate")
        lines += ["", "Server metrics (scraped during the run):", "",
                  f"- prefix cache hit rate: {'–' if hit is None else f'{hit:.1%}'}"]
        for g in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            if g in srv:
                lines.append(f"- {g}: mean {srv[g]['mean']:.2f}, max {srv[g]['max']:.2f}")
    else:
        lines += ["", f"Server metrics: not available ({'; '.join(srv.get('errors', [])[:2]) or 'no samples'})"]
    client_hit = s["prefix_cache_client"]["hit_rate"]  # type: ignore[index]
    if client_hit is not None:
        lines.append(f"- prefix hit rate from usage.cached_tokens: {client_hit:.1%}")
    if s.get("errors_sample"):
        lines += ["", "Errors (first few):", ""] + [f"- `{e['status']}`: {e['error']}" for e in s["errors_sample"]]  # type: ignore[union-attr]
    lines += ["", "Definitions (send t0, content chunks t1..tk, n output tokens):", "",
              "| metric | definition | also called |", "|---|---|---|"]
    lines += [f"| {k} | {v['definition']} | {v['aliases']} |" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def write_run(res: RunResult, out: Path, title: str = "Benchmark run", plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result_json(res), indent=1, default=float) + "\n")
    rows = [r.to_row() for r in res.records]
    if rows:
        with (out / "requests.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if res.timeline:
        keys = sorted({k for s in res.timeline for k in s})
        with (out / "server_metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(res.timeline)
    (out / "report.md").write_text(markdown(res, title))
    if plots:
        from inferstack.bench.plots import plot_run
        plot_run(res, out)


def sweep_rows(results: Sequence[tuple[str, RunResult]]) -> list[dict[str, object]]:
    rows = []
    for label, res in results:
        s = res.summary
        lat, thr = s["latency_s"], s["throughput"]  # type: ignore[index]
        rows.append({
            "run": label, "target_rate": s["load"]["target_rate"],  # type: ignore[index]
            "send_rate": s["load"]["send_rate"],  # type: ignore[index]
            "requests_per_s": thr["requests_per_s"], "output_tokens_per_s": thr["output_tokens_per_s"],
            **{f"{k}_{p}_ms": (lat[k][p] * 1e3 if lat[k] else None) for k in ("ttft", "tpot", "itl", "e2e")
               for p in ("mean", "p50", "p99")},
            "failed": s["requests"]["failed"],  # type: ignore[index]
            "slo_attainment": s["slo"]["attainment"] if "slo" in s else None,  # type: ignore[index]
            "goodput_requests_per_s": s["slo"]["goodput_requests_per_s"] if "slo" in s else None,  # type: ignore[index]
            "prefix_hit_rate": res.server.get("prefix_cache_hit_rate"),
        })
    return rows


def write_series(results: Sequence[tuple[str, RunResult]], out: Path, kind: str, extra: dict | None = None) -> None:
    """Reports for a sweep or goodput search: one row per run, plots against the offered rate."""
    rows = sweep_rows(results)
    (out / f"{kind}.json").write_text(json.dumps({"runs": rows, **(extra or {})}, indent=1, default=float) + "\n")
    with (out / f"{kind}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ["run", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50", "ITL p99", "E2E p50",
            "failed", "SLO att.", "hit rate"]
    lines = [f"# {kind}", ""]
    if extra:
        lines += [f"- {k}: {v}" for k, v in extra.items()] + [""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: object, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        lines.append(f"| {r['run']} | {f(r['requests_per_s'], '.2f')} | {f(r['output_tokens_per_s'], '.0f')} | "
                     f"{f(r['ttft_p50_ms'], '.1f')} | {f(r['ttft_p99_ms'], '.1f')} | {f(r['tpot_p50_ms'], '.1f')} | "
                     f"{f(r['itl_p50_ms'], '.1f')} | {f(r['itl_p99_ms'], '.1f')} | {f(r['e2e_p50_ms'], '.0f')} | "
                     f"{r['failed']} | {f(r['slo_attainment'], '.1%')} | {f(r['prefix_hit_rate'], '.1%')} |")
    (out / f"{kind}.md").write_text("\n".join(lines) + "\n")
    from inferstack.bench.plots import plot_series
    plot_series(rows, out / f"{kind}.png")
