"""Summaries over request records: latency distributions, throughput, SLO attainment and goodput."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from inferstack.bench.records import RequestRecord
from inferstack.bench.slo import SLO

PERCENTILES = (50, 90, 95, 99)

# Every metric we report, its definition, and what other tools call the same number.
DEFINITIONS: dict[str, dict[str, str]] = {
    "ttft": {"definition": "t1 − t0: send to first content chunk",
             "aliases": "vLLM/genai-perf/inference-perf/guidellm TTFT; OTel time_to_first_chunk"},
    "tpot": {"definition": "(E2E − TTFT)/(n − 1), per request, n ≥ 2",
             "aliases": "vLLM TPOT; genai-perf ITL; guidellm ITL (inter_token_latency); OTel time_per_output_token"},
    "itl": {"definition": "gaps t(i+1) − t(i) between content chunks, pooled over requests",
            "aliases": "vLLM bench ITL; inference-perf ITL; vLLM server inter_token_latency_seconds (per step)"},
    "e2e": {"definition": "tk − t0: send to last content chunk (non-streaming: to the full response)",
            "aliases": "vLLM E2EL; genai-perf request latency; guidellm request_latency; OTel request.duration"},
    "e2e_per_token": {"definition": "E2E / n, TTFT included",
                      "aliases": "guidellm TPOT (time_per_output_token); inference-perf NTPOT"},
}


def dist(values: Sequence[float] | np.ndarray) -> dict[str, float] | None:
    a = np.asarray([v for v in values if v is not None], dtype=float) if not isinstance(values, np.ndarray) \
        else values.astype(float)
    if a.size == 0:
        return None
    out = {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES), strict=True):   # numpy linear, as vLLM
        out[f"p{p}"] = float(v)
    out["max"] = float(a.max())
    return out


def meets(rec: RequestRecord, slo: SLO) -> bool:
    if not rec.ok:
        return False
    values = {"ttft": rec.ttft, "tpot": rec.tpot, "itl": rec.itl_mean, "e2e": rec.e2e}
    for key, limit in slo.limits_s.items():
        v = values[key]
        if v is None:
            # TPOT/ITL need two tokens: a one-token reply has nothing to miss (vLLM counts it as 0)
            if key in ("tpot", "itl") and rec.ok and rec.output_tokens < 2:
                continue
            return False
        if v > limit:
            return False
    return True


def _load(inc: list[RequestRecord], target_rate: float | None, planned_rate: float | None) -> dict[str, object]:
    """The offered load: asked, planned, and as sent (first stages only), with the sender's lag behind plan."""
    # arrivals are units: later stages of a session or agent task are sent when the earlier ones finish
    firsts = [r for r in inc if r.stage == 0]
    sends = sorted(r.sent for r in firsts)
    lags = np.asarray([r.schedule_lag for r in firsts]) if firsts else np.empty(0)
    return {
        "target_rate": target_rate,
        "planned_rate": planned_rate,      # the arrival process's own sample (Poisson varies around the target)
        "send_rate": (len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 2 and sends[-1] > sends[0] else None,
        "schedule_lag_s": dist(lags),
    }


def _client_prefix_hits(prompt_known: list[RequestRecord]) -> dict[str, object]:
    """Cached prompt tokens over prompt tokens, from the usage of responses that report both."""
    cached = [r for r in prompt_known if r.cached_tokens is not None]
    return {
        "requests_reporting": len(cached),
        "hit_rate": (sum(r.cached_tokens or 0 for r in cached) / max(1, sum(r.prompt_tokens or 0 for r in cached)))
        if cached else None,
    }


def _slo(inc: list[RequestRecord], slo: SLO, duration: float) -> dict[str, object]:
    """Attainment (share of sent requests meeting every limit) and goodput against `slo`."""
    good = [r for r in inc if meets(r, slo)]
    return {
        "spec": dict(slo.limits_s.items()), "attainment_target": slo.attainment,
        "attainment": len(good) / len(inc) if inc else 0.0,
        "goodput_requests_per_s": len(good) / duration,
        "met": (len(good) / len(inc) >= slo.attainment) if inc else False,
    }


def summarize(records: Sequence[RequestRecord], window: tuple[float, float], slo: SLO | None = None,
              target_rate: float | None = None, planned_rate: float | None = None) -> dict[str, object]:
    """Statistics over the requests sent inside `window` (run clock seconds)."""
    start, end = window
    inc = [r for r in records if r.included]
    ok = [r for r in inc if r.ok]
    # An overloaded server finishes window requests after the window: throughput counts until the last one.
    last_end = max((r.end for r in ok), default=end)
    duration = max(end - start, last_end - start, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_known = [r for r in ok if r.prompt_tokens is not None]
    in_tokens = sum((r.prompt_tokens if r.prompt_tokens is not None else r.input_tokens_nominal) for r in ok)
    itl_pool = np.concatenate([r.itls for r in ok]) if ok else np.empty(0)
    summary: dict[str, object] = {
        "window_s": [start, end],
        "duration_s": duration,
        "requests": {
            "sent": len(inc), "completed": len(ok), "failed": len(inc) - len(ok),
            "by_status": dict(Counter(r.status for r in inc)),
            "excluded_warmup_cooldown": len(records) - len(inc),
        },
        "throughput": {
            "requests_per_s": len(ok) / duration,
            "output_tokens_per_s": out_tokens / duration,
            "input_tokens_per_s": in_tokens / duration,
            "total_tokens_per_s": (in_tokens + out_tokens) / duration,
        },
        "tokens": {"input_total": in_tokens, "output_total": out_tokens,
                   "input_source": ("server usage" if len(prompt_known) == len(ok)
                                    else "usage where reported, else nominal")},
        "latency_s": {
            "ttft": dist([r.ttft for r in ok]),
            "tpot": dist([r.tpot for r in ok]),
            "itl": dist(itl_pool),
            "e2e": dist([r.e2e for r in ok]),
            "e2e_per_token": dist([r.e2e_per_token for r in ok]),
        },
        "load": _load(inc, target_rate, planned_rate),
        "prefix_cache_client": _client_prefix_hits(prompt_known),
        "definitions": DEFINITIONS,
    }
    if slo is not None:
        summary["slo"] = _slo(inc, slo, duration)
    errors = [r for r in inc if not r.ok]
    if errors:
        summary["errors_sample"] = [{"status": r.status, "error": r.error[:300]} for r in errors[:5]]
    return summary
